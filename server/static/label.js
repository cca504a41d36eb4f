// The labeling page: ask the server for a comparison, show the two anonymous responses,
// send the vote (buttons or keys 1-4), then show which models answered. By default the
// comparison is the arena's: the request names no model and no decoding, the server draws
// the pair, so the page holds nothing that tells the models apart until the vote reveals
// them. Admins (and everyone on a server without tokens) also get the operator panel, to
// pick the models or two samples of one and the decoding. A prompt is text or
// a conversation (drawn from the server's --feedback-prompts file); a conversation is shown
// turn by turn above the responses. Data is only ever put in the page as text (textContent):
// prompts, messages and responses are whatever people and models wrote. api() (api.js) asks
// for a token when the server wants one; votes are then recorded under the token's name.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null;  // the comparison on screen, until voted
let drawnMessages = null;  // the conversation drawn as the prompt, or null for the text box
let caller = null;  // the token's name, when the server has tokens and one is given
let modelsListed = false;  // the operator's datalist of model names, fetched once when first needed

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function annotator() {
  // A stable id per browser unless the person types their own.
  let id = $("annotator").value.trim() || localStorage.getItem("rlhfkit-annotator");
  if (!id) id = "anon-" + Math.random().toString(36).slice(2, 10);
  localStorage.setItem("rlhfkit-annotator", id);
  $("annotator").value = id;
  return id;
}

// One element per turn: the role, then the content, both as text.
function renderConversation(container, messages) {
  container.replaceChildren(...messages.map((m) => {
    const turn = document.createElement("div");
    turn.className = "turn";
    turn.dataset.role = m.role;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = m.role;
    const content = document.createElement("pre");
    content.className = "content";
    content.textContent = m.content;
    turn.append(role, content);
    return turn;
  }));
  container.hidden = messages.length === 0;
}

function setDrawnMessages(messages) {
  drawnMessages = messages;
  $("prompt").hidden = messages !== null;
  $("drawn").hidden = messages === null;
  renderConversation($("drawn-conversation"), messages || []);
  if (messages !== null) $("prompt").value = "";
}

async function compare() {
  const prompt = $("prompt").value;
  if (drawnMessages === null && !prompt.trim()) return status("Type a prompt or draw one first.", true);
  const body = drawnMessages !== null ? {messages: drawnMessages} : {prompt};
  const source = $("source") ? $("source").value : "arena";  // no panel: the arena
  if (source !== "arena") {
    body.sampling = {temperature: Number($("temperature").value), maxNewTokens: Number($("max-new-tokens").value)};
    if (source === "models") body.models = {modelA: $("model-a").value, modelB: $("model-b").value};
    else body.samplesOf = $("samples-of").value;
  }
  status("Generating…");
  $("compare").disabled = true;
  try {
    current = await api("/api/comparisons", body);
    renderConversation($("battle-conversation"), current.messages || []);
    $("left").textContent = current.left;
    $("right").textContent = current.right;
    $("left-model").textContent = $("right-model").textContent = "";
    $("reveal").hidden = true;
    $("reveal").textContent = "";  // the last pair's names: nothing of a revealed vote stays behind
    $("rationale").value = "";
    document.querySelectorAll(".votes button").forEach((b) => { b.disabled = false; b.classList.remove("chosen"); });
    $("battle").hidden = false;
    status("Which response is better? Click or press 1-4.");
  } catch (e) {
    // A 403 here is the models chosen by a token that is not an admin's: say so plainly.
    status(e.message.startsWith("PERMISSION_DENIED") ? `Choosing the models needs an admin token. ${e.message}`
      : e.message, true);
  } finally {
    $("compare").disabled = false;
  }
}

async function vote(button) {
  if (!current || button.disabled) return;
  const body = {comparisonId: current.comparison_id, choice: button.dataset.choice};
  if (caller === null) body.annotatorId = annotator();  // with a token the server knows who votes
  if ($("rationale").value.trim()) body.rationale = $("rationale").value.trim();
  document.querySelectorAll(".votes button").forEach((b) => { b.disabled = true; });
  try {
    const v = await api("/api/votes", body);
    button.classList.add("chosen");
    $("left-model").textContent = v.left_model_version;
    $("right-model").textContent = v.right_model_version;
    $("reveal").textContent = `Left was ${v.left_model}, right was ${v.right_model}. Vote ${v.vote_id} recorded.`;
    $("reveal").hidden = false;
    status("Thanks! Draw or type another prompt.");
    current = null;
  } catch (e) {
    document.querySelectorAll(".votes button").forEach((b) => { b.disabled = false; });
    status(e.message, true);
  }
}

async function draw() {
  try {
    const drawn = await api("/api/prompt");  // {prompt: text} or {messages: [{role, content}, ...]}
    if (drawn.messages) {
      setDrawnMessages(drawn.messages);
    } else {
      setDrawnMessages(null);
      $("prompt").value = drawn.prompt;
    }
  } catch (e) { status(e.message, true); }
}

async function listModels() {
  if (modelsListed) return;
  modelsListed = true;
  try {
    const {models} = await api("/api/models");
    $("model-names").replaceChildren(...models.map((m) => Object.assign(document.createElement("option"), {value: m})));
  } catch (e) { /* the datalist is a convenience */ }
}

// The operator panel, for admins only; the arena stays the default choice.
function showOperatorPanel(show) {
  if (!show) return $("operator")?.remove();  // signed in again with a token that is not an admin's
  if ($("operator")) return;
  $("ask").append($("operator-panel").content.cloneNode(true));
  $("source").onchange = () => {
    const source = $("source").value;
    $("chosen").hidden = source === "arena";
    $("models-box").hidden = source !== "models";
    $("samples-box").hidden = source !== "samples";
    if (source !== "arena") listModels();  // names only once the operator asks for them
  };
}

$("draw").onclick = draw;
$("type-instead").onclick = () => { setDrawnMessages(null); $("prompt").focus(); };
$("compare").onclick = compare;
document.querySelectorAll(".votes button").forEach((b) => { b.onclick = () => vote(b); });
document.addEventListener("keydown", (e) => {
  if (["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName)) return;  // typing, not voting
  const button = {"1": "vote-left", "2": "vote-right", "3": "vote-tie", "4": "vote-both-bad"}[e.key];
  if (button) vote($(button));
});
// Who votes: the token's name on a server with tokens (not editable), else the annotator box.
async function showCaller() {
  try {
    const who = await api("/api/whoami");
    caller = who.open ? null : who.name;
    showOperatorPanel(who.open || who.role === "admin");
  } catch (e) { status(e.message, true); return; }
  $("annotator").readOnly = caller !== null;
  if (caller !== null) $("annotator").value = caller;
}

$("annotator").value = localStorage.getItem("rlhfkit-annotator") || "";
if (!hasToken()) annotator();
document.addEventListener("rlhfkit-token", showCaller);
showCaller();
