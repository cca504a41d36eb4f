// The JSON API as the pages call it. A server with --auth-tokens answers 401 without a token:
// the page then asks for one, keeps it in sessionStorage (this tab only, gone when it closes)
// and sends it as `Authorization: Bearer` on every call. A later 401 (a mistyped or revoked
// token) forgets it and asks again. A server without tokens never answers 401: no prompt.
"use strict";
const TOKEN_KEY = "rlhfkit-token";
let tokenAsked = null;  // the one open prompt, shared by the calls that got 401 together

function askToken(reason) {
  if (tokenAsked) return tokenAsked;
  tokenAsked = new Promise((resolve) => {
    const form = document.createElement("form");
    form.id = "login";
    const label = Object.assign(document.createElement("label"), {htmlFor: "token", textContent: reason});
    const input = Object.assign(document.createElement("input"),
      {id: "token", type: "password", autocomplete: "off", size: 40, placeholder: "token"});
    const button = Object.assign(document.createElement("button"),
      {id: "sign-in", type: "submit", className: "primary", textContent: "Sign in"});
    form.append(label, input, button);
    form.onsubmit = (e) => {
      e.preventDefault();
      if (!input.value.trim()) return;
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      form.remove();
      tokenAsked = null;
      document.dispatchEvent(new Event("rlhfkit-token"));
      resolve();
    };
    document.querySelector("main").prepend(form);
    input.focus();
  });
  return tokenAsked;
}

function hasToken() {
  return sessionStorage.getItem(TOKEN_KEY) !== null;
}

// GET path, or POST body as JSON; the reply's JSON, or an Error "CODE: message".
async function api(path, body) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = token ? {Authorization: `Bearer ${token}`} : {};
    const init = body === undefined ? {headers} :
      {method: "POST", headers: {...headers, "Content-Type": "application/json"}, body: JSON.stringify(body)};
    const resp = await fetch(path, init);
    const data = await resp.json().catch(() => ({code: "UNAVAILABLE", error: `HTTP ${resp.status}`}));
    if (resp.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      await askToken(token ? "The server does not accept that token. Your token:" : "This server needs your token:");
      continue;
    }
    if (!resp.ok) throw new Error(`${data.code}: ${data.error}`);
    return data;
  }
}
