// The page of `deltalm serve`: POST /v1/translate with "stream": true and show the server-sent
// events as they come: a sentence's best hypothesis so far (partial records), then its n-best.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function sentenceBox(k, source) {
  const box = document.createElement("div");
  box.className = "sentence";
  box.id = `sentence-${k}`;
  box.innerHTML = '<div class="source"></div><div class="translation partial"></div><ol class="nbest"></ol>';
  box.querySelector(".source").textContent = source;
  return box;
}

function showRecord(record) {
  const box = $(`sentence-${record.id}`);
  if (!box) return;
  const translation = box.querySelector(".translation");
  if (record.partial) {
    translation.textContent = record.text;
    return;
  }
  translation.classList.remove("partial");
  translation.textContent = record.nbest.length ? record.nbest[0].text : "";
  const list = box.querySelector(".nbest");
  list.replaceChildren();
  for (const hypothesis of record.nbest) {
    const item = document.createElement("li");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hypothesis.score === null ? "-inf" : hypothesis.score.toFixed(4);
    item.append(hypothesis.text, score);
    list.append(item);
  }
}

// One server-sent event (its lines without the blank line that ended it): the data field.
function eventData(block) {
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return data.length ? data.join("\n") : null;
}

async function translate(event) {
  event.preventDefault();
  const lines = $("text").value.split("\n").map((s) => s.trim()).filter((s) => s.length);
  if (!lines.length) return;
  const results = $("results");
  results.replaceChildren(...lines.map((s, k) => sentenceBox(k, s)));
  $("translate").disabled = true;
  setStatus("running", "translating…");
  const body = { text: lines, beam: Number($("beam").value), nbest: Number($("nbest").value), stream: true };
  try {
    const response = await fetch("/v1/translate", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) {
      const answer = await response.json().catch(() => null);
      throw new Error(answer && answer.error ? answer.error.message : `HTTP ${response.status}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = eventData(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (data === null) continue;
        if (data === "[DONE]") { finished = true; break; }
        const record = JSON.parse(data);
        if (record.error) throw new Error(record.error.message);
        showRecord(record);
      }
    }
    if (!finished) throw new Error("the stream ended early");
    setStatus("done", "done");
  } catch (error) {
    setStatus("error", String(error.message || error));
  } finally {
    $("translate").disabled = false;
  }
}

$("form").addEventListener("submit", translate);
