// The labelling page. Every text from the server is set with textContent, never innerHTML: a response
// holding "<script>" or "<img onerror=...>" is shown as those characters and never becomes markup.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { annotator: "", candidate: null, leftSide: "a", shownAt: 0, busy: false, done: false };

// Which side is shown on the left: a fixed coin per (annotator, pair), so a reload shows the same layout
// but position cannot become a cue across pairs or annotators. FNV-1a, 32-bit, over UTF-16 code units.
function leftSideFor(annotator, id) {
  let hash = 0x811c9dc5;
  const key = annotator + "\n" + id;
  for (let i = 0; i < key.length; i++) {
    hash ^= key.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return (hash & 1) ? "b" : "a";
}

async function call(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error("the server cannot be reached (is it running?); nothing was lost, try again");
  }
  let data = null;
  try { data = await response.json(); } catch (error) { data = null; }
  if (!response.ok) {
    const problem = new Error((data && data.error) || ("HTTP " + response.status));
    problem.status = response.status;
    throw problem;
  }
  return data;
}

function say(message, isError) {
  $("status").textContent = message;
  $("status").classList.toggle("error", Boolean(isError));
}

function setBusy(busy) {
  state.busy = busy;
  const canChoose = !busy && state.candidate !== null;
  document.querySelectorAll("button[data-choice]").forEach((b) => { b.disabled = !canChoose; });
  $("undo").disabled = busy || !state.annotator;
}

function showProgress(progress) {
  $("progress").textContent = progress.labelled + " of " + progress.total + " labelled";
}

function fill(panel, side, candidate) {
  panel.dataset.side = side;
  panel.querySelector(".text").textContent = candidate[side];
  panel.querySelector(".text").scrollTop = 0;
  const img = panel.querySelector("img");
  const media = candidate[side + "_media"];
  if (media) {
    img.src = "media/" + media.split("/").map(encodeURIComponent).join("/");
    img.hidden = false;
  } else {
    img.removeAttribute("src");
    img.hidden = true;
  }
}

function show(next) {
  showProgress(next.progress);
  state.candidate = next.candidate;
  state.done = next.done;
  $("welcome").hidden = true;
  $("pair").hidden = next.done;
  $("finished").hidden = !next.done;
  if (next.done) {
    $("finished").textContent = "All " + next.progress.total + " pairs are labelled. Thank you! " +
      "(Undo still takes back your last label.)";
    $("pair").dataset.id = "";
    return;
  }
  const candidate = next.candidate;
  state.leftSide = leftSideFor(state.annotator, candidate.id);
  $("pair").dataset.id = candidate.id;
  $("prompt-text").textContent = candidate.prompt;
  $("prompt-text").scrollTop = 0;
  fill($("left"), state.leftSide, candidate);
  fill($("right"), state.leftSide === "a" ? "b" : "a", candidate);
  $("reason").value = "";
  state.shownAt = performance.now();
}

async function loadNext() {
  setBusy(true);
  try {
    show(await call("GET", "api/next?annotator=" + encodeURIComponent(state.annotator)));
  } catch (error) {
    say(error.message, true);
  } finally {
    setBusy(false);
  }
}

// "left"/"right" are positions on the screen; the label names the candidate's own side.
function choiceFor(button) {
  const choice = button.dataset.choice;
  if (choice === "left") return state.leftSide;
  if (choice === "right") return state.leftSide === "a" ? "b" : "a";
  return choice;
}

const SAID = { left: "A is better", right: "B is better", tie: "a tie", both_bad: "both bad", skip: "skipped" };

async function label(button) {
  if (state.busy || !state.candidate) return;
  const id = state.candidate.id;
  const choice = choiceFor(button);
  const body = { id, annotator: state.annotator, choice, reason: $("reason").value.trim(),
                 seconds: Math.round((performance.now() - state.shownAt)) / 1000 };
  setBusy(true);
  try {
    await call("POST", "api/label", body);
    say("Saved (" + id + "): " + SAID[button.dataset.choice] + ".");
  } catch (error) {
    if (error.status !== 409) {  // 409: already labelled (another tab); move on like the server did
      say("Not saved: " + error.message, true);
      setBusy(false);
      return;
    }
    say(error.message);
  }
  await loadNext();
}

async function undo() {
  if (state.busy || !state.annotator) return;
  setBusy(true);
  try {
    const answer = await call("POST", "api/undo", { annotator: state.annotator });
    say(answer.undone === null ? "Nothing to undo." : "Undone: your label of " + answer.undone + ".");
  } catch (error) {
    say("Undo failed: " + error.message, true);
    setBusy(false);
    return;
  }
  await loadNext();
}

function start() {
  const name = $("annotator").value.trim();
  if (!name || name === state.annotator) return;
  state.annotator = name;
  try { localStorage.setItem("lightrlhf.annotator", name); } catch (error) { /* private mode */ }
  say("");
  loadNext();
}

function typing(target) {
  return target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement;
}

const KEYS = { a: "choose-left", b: "choose-right", t: "choose-tie", x: "choose-both-bad", s: "choose-skip" };

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && typing(event.target)) { event.target.blur(); return; }
  if (typing(event.target) || event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  const key = event.key.toLowerCase();
  if (KEYS[key]) { event.preventDefault(); if (!$(KEYS[key]).disabled) label($(KEYS[key])); }
  else if (key === "u") { event.preventDefault(); undo(); }
});

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("button[data-choice]").forEach((b) => b.addEventListener("click", () => label(b)));
  $("undo").addEventListener("click", undo);
  $("annotator").addEventListener("change", start);
  $("annotator").addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); start(); $("annotator").blur(); }
  });
  let saved = null;
  try { saved = localStorage.getItem("lightrlhf.annotator"); } catch (error) { saved = null; }
  if (saved) { $("annotator").value = saved; start(); }
});
