// The writing assistant: one streamed /v1/completions request with n=3, one draft per choice.
"use strict";

const $ = (id) => document.getElementById(id);
const drafts = [...document.querySelectorAll(".draft")];

for (const [slider, output] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
  $(slider).addEventListener("input", () => { $(output).textContent = $(slider).value; });
}

for (const draft of drafts) {
  draft.querySelector(".copy").addEventListener("click", async (event) => {
    const text = draft.querySelector(".text").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const area = document.createElement("textarea");  // clipboard API needs a secure context
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    event.target.textContent = "Copied";
    setTimeout(() => { event.target.textContent = "Copy"; }, 1200);
  });
}

function promptFor(title) {
  return `Title: ${title.trim()}\n\n`;
}

function requestBody(title) {
  return {
    prompt: promptFor(title),
    n: drafts.length,
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    top_k: Number($("top-k").value),
    max_tokens: Number($("max-tokens").value),
    ignore_eos: !$("stop-at-end").checked,
  };
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch {
    return response.statusText;
  }
}

// Reads `data: {json}` server-sent events from a fetch response, calling onEvent per event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

async function generate(event) {
  event.preventDefault();
  const title = $("title").value;
  if (!title.trim()) return;
  $("generate").disabled = true;
  $("status").textContent = "";
  for (const draft of drafts) {
    draft.classList.remove("done");
    draft.classList.add("writing");
    draft.querySelector(".text").textContent = "";
  }
  try {
    const response = await fetch("/v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody(title)),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        const draft = drafts[choice.index];
        draft.querySelector(".text").textContent += choice.text;
        if (choice.finish_reason) {
          draft.classList.remove("writing");
          draft.classList.add("done");
        }
      }
    });
  } catch (error) {
    $("status").textContent = `Could not generate: ${error.message}`;
  } finally {
    for (const draft of drafts) draft.classList.remove("writing");
    $("generate").disabled = false;
  }
}

$("compose").addEventListener("submit", generate);
