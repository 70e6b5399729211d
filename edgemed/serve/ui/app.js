// The clinician page of `edgemed serve`: talks to this server's /v1 API only (same origin), like any client.
// Every piece of text from the model or the user is put on the page with textContent, never as HTML; the
// server's Content-Security-Policy (Trusted Types, no inline script) makes the browser refuse HTML from strings.
// Nothing is written to localStorage, sessionStorage or IndexedDB; the API key, when one is needed, lives in a variable
// of this page only (see heldKey).
"use strict";

(function () {
  const CARD_LABELS = {
    model_name: "Model", version: "Version", developer: "Developer", license: "License",
    intended_use: "Intended use", intended_users: "Intended users", decision_role: "Decision role",
    out_of_scope_use: "Not for", known_limitations: "Known limitations",
  };
  // A question that leaves the model no room to answer (the server's context_length_exceeded), in the clinician's
  // words: the server's own message names the operator's flags (--ctx, --slots). The first question of a conversation
  // is too long by itself: a new conversation would give the same, so it is to be shortened.
  const TOO_LONG = "This conversation is too long for the model: Save it, then start a New conversation.";
  const QUESTION_TOO_LONG = "This question is too long for the model: shorten it, and send again.";
  const FORM_TOO_LONG = "The form's text is too long for the model: shorten it, and send again.";

  const $ = (id) => document.getElementById(id);
  // Clinical text is not spell-checked: a browser's enhanced spell check sends what is typed to an online service.
  const CLINICAL_TEXT = { spellcheck: "false", autocapitalize: "off" };
  // conversation: which conversation is on screen (New conversation counts it up): an answer still settling from an
  // earlier one never lands in the history or the transcript of the next patient's.
  const state = { info: null, templates: {}, history: [], busy: null, transcript: [], conversation: 0 };

  // The bidirectional embedding, override and isolate controls (U+202A-U+202E, U+2066-U+2069) and the invisible
  // direction marks (U+200E, U+200F, U+061C) reorder the text around them on screen: "Give \u202e gm 01\u202c" reads
  // "Give 10 mg" ("Trojan Source"). Text of the model's or the user's is shown, copied and saved with each of them
  // written as its escape, as the CLI prints them (formats/terminal_text.shown): what the clinician reads is the text
  // in the order it was written, and the same as the saved text. What goes to the model is the text as it is.
  const BIDI = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;
  function shown(text) {
    return String(text).replace(BIDI, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = shown(v);
      else if (k === "class") node.className = v;
      else if (k === "hidden") node.hidden = Boolean(v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  // The status line: ``warn`` marks what is not a whole answer or not a working page (an answer cut, stopped or
  // failed; a server out of reach), set apart from "Answered." at a glance; ``detail`` is the technical text
  // (the server's own message, for IT), folded under the line. Each status replaces the last one's detail.
  function setStatus(text, opts) {
    const { warn = false, detail = "" } = opts || {};
    $("status").textContent = text;
    $("status").classList.toggle("warn", Boolean(warn));
    $("status-detail").hidden = !detail;
    $("status-detail-text").textContent = shown(detail);
  }

  // -- the key ---------------------------------------------------------------------------------------------
  // The key is held in this variable only, never in sessionStorage: a browser restores a tab's sessionStorage with the
  // tab (reopening a closed tab, restoring the session at start-up or after a crash, Duplicate tab), which signed the
  // next person at a shared workstation in as the last clinician. A reload asks for the key again.
  let heldKey = "";
  function apiKey() { return heldKey; }

  // Why ``key`` cannot be one, in the clinician's words ("" when it can): a key is printable ASCII (the server's keys
  // hold no space, and a browser refuses any other header value, which read as "the server cannot be reached"). A copy
  // from a mail or a chat often brings an invisible character with it (U+200B, U+00A0).
  function keyProblem(key) {
    const bad = [...key].find((c) => c < "!" || c > "~");
    if (bad === undefined) return "";
    const code = "U+" + bad.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
    return "That key holds a character a key cannot have (" + code + "): paste it again without it.";
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = apiKey();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // ``detail``: the server's own words for a refusal, folded under the status line for IT.
  function askForKey(message, status, detail) {
    heldKey = "";
    $("forget-key").hidden = true;
    $("key-panel").hidden = false;
    $("key-error").textContent = message || "";
    setStatus(status || "An API key is needed.", { detail: detail || "" });
    $("key").focus();
  }

  // Sign out (forget key), for the next person at a shared workstation: the key goes, and with it everything New
  // conversation clears (the history, the transcript Save would write, the answers on screen, an answer still
  // streaming) and the question typed but not sent; the ask form stays hidden until a key is given again.
  // A key the server refuses mid-conversation (revoked, rotated at a shift change) signs out the same way: whoever
  // sits at the screen next has no key either, so the conversation goes with it. ``refused``: the server's message,
  // kept as the technical detail; the key panel says what happened in the clinician's words.
  function signOut(refused) {
    const words = keyWords();  // before the key is forgotten: refused, or never given
    clearConversation();
    $("prompt").value = "";
    $("template-fields").replaceChildren();
    $("ask").hidden = true;
    $("card").hidden = true;
    if (refused === undefined) {
      askForKey("", "Signed out: the key is forgotten and the conversation cleared. Enter a key to go on.");
    } else {
      askForKey(words, (words === KEY_REFUSED ? "The key was refused" : "The server asks for a key") +
                ", so the conversation on screen was cleared. Enter a key to go on.", refused);
    }
  }

  // The error of a response that is not ok: its OpenAI-shaped message, and its code when it has one.
  async function errorOf(response) {
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return { message: body.error.message, code: body.error.code || "" };
    } catch (e) { /* not JSON */ }
    return { message: "The server answered " + response.status + ".", code: "" };
  }

  // -- start: the model, its card, the templates -------------------------------------------------------------
  // The page could not start: in the clinician's words, what to do; what IT needs to look into under "Technical
  // detail".
  const NOT_REACHABLE = "The assistant cannot be reached from this page. Reload the page in a moment; if it still " +
                        "cannot be reached, contact IT or whoever runs the assistant.";
  const NOT_AVAILABLE = "The assistant is not available now. Reload the page in a moment; if it is still not " +
                        "available, contact IT or whoever runs the assistant.";

  async function load() {
    let response;
    try {
      response = await fetch("/ui/info", { headers: headers(false), cache: "no-store" });
    } catch (e) {
      setStatus(NOT_REACHABLE, { warn: true, detail: "No answer from the edgemed server at " + location.origin +
                                                     " (GET /ui/info: " + e.message + "). Is `edgemed serve` running?" });
      return;
    }
    if (response.status === 401) {
      askForKey(apiKey() ? "That key was refused. Check it and try again." : "");
      return;
    }
    if (!response.ok) {
      const error = await errorOf(response);
      setStatus(NOT_AVAILABLE, { warn: true, detail: "GET /ui/info answered " + response.status + ": " + error.message });
      return;
    }
    const info = await response.json();
    state.info = info;
    $("key-panel").hidden = true;
    $("forget-key").hidden = !apiKey();
    showCard(info);
    await loadModels(info.model);
    buildModes(info.templates);
    $("ask").hidden = false;
    $("conversation").hidden = state.transcript.length === 0;
    setStatus("Ready. " + (info.keys_required ? "Requests use your key; " : "") +
              "each answer shows its audit request id.");
    $("prompt").focus();
  }

  function showCard(info) {
    const dl = $("card-fields");
    dl.replaceChildren();
    const card = info.card || {};
    const keys = Object.keys(CARD_LABELS).filter((k) => card[k] !== undefined && card[k] !== "");
    for (const k of keys) {
      const value = card[k];
      const dd = el("dd", { "data-field": k });
      if (Array.isArray(value)) dd.append(el("ul", {}, ...value.map((v) => el("li", { text: String(v) }))));
      else dd.textContent = shown(value);
      dl.append(el("dt", { text: CARD_LABELS[k] }), dd);
    }
    $("card-missing").hidden = keys.some((k) => k !== "license");  // a license alone is no card
    $("card").hidden = false;
  }

  async function loadModels(served) {
    const select = $("model");
    select.replaceChildren();
    let ids = [served];
    try {
      const response = await fetch("/v1/models", { headers: headers(false), cache: "no-store" });
      if (response.ok) {
        const body = await response.json();
        const listed = (body.data || []).map((m) => m.id).filter((id) => typeof id === "string");
        if (listed.length) ids = listed;
      }
    } catch (e) { /* keep the served model */ }
    for (const id of ids) select.append(el("option", { value: id, text: id }));
    select.value = ids.includes(served) ? served : ids[0];
    select.disabled = ids.length < 2;
  }

  // -- tasks: the chat, or one template's form ---------------------------------------------------------------
  function buildModes(templates) {
    const select = $("mode");
    select.replaceChildren(el("option", { value: "", text: "Free question (chat)" }));
    state.templates = {};
    for (const t of templates) {
      state.templates[t.name] = t;
      select.append(el("option", { value: t.name, text: t.title + " (" + t.name + ")" }));
    }
    showMode("");
  }

  function showMode(name) {
    const t = state.templates[name];
    $("chat-form").hidden = Boolean(t);
    $("template-form").hidden = !t;
    if (t) buildForm(t);
  }

  function fieldId(name) { return "tpl-" + name; }
  function fieldLabel(name) { return name.replace(/_/g, " "); }
  // A choice form needs this many options: with one there is nothing to choose between.
  const MIN_OPTIONS = 2;

  function buildForm(t) {
    $("template-title").textContent = t.title;
    const box = $("template-fields");
    box.replaceChildren();
    for (const f of t.fields) {
      const id = fieldId(f.name);
      const label = el("label", { for: id, text: fieldLabel(f.name) + (f.required ? " (required)" : " (optional)") });
      const help = f.help ? el("p", { id: id + "-help", class: "hint", text: f.help }) : null;
      if (f.kind === "options") {
        box.append(optionsEditor(f));
        continue;
      }
      const attrs = { id, name: f.name, "data-field": f.name, ...CLINICAL_TEXT };
      if (help) attrs["aria-describedby"] = id + "-help";
      if (f.required) attrs.required = "";
      const input = f.kind === "long" ? el("textarea", { ...attrs, rows: "4" }) : el("input", { ...attrs, type: "text" });
      if (f.default) input.value = f.default;
      box.append(el("div", { class: "field" }, label, input, help));
    }
  }

  function optionsEditor(f) {
    const set = el("fieldset", { class: "field options", "data-field": f.name, id: fieldId(f.name) },
                   el("legend", { text: "Options (required: at least " + MIN_OPTIONS + ")" }));
    const rows = el("div", { class: "option-rows" });
    const add = el("button", { type: "button", text: "Add an option" });
    const addRow = (text) => {
      const letter = String.fromCharCode(65 + rows.children.length);
      const id = fieldId(f.name) + "-" + letter;
      rows.append(el("div", { class: "option" }, el("label", { for: id, text: "Option " + letter }),
                     el("input", { id, type: "text", "data-letter": letter, value: text || "", ...CLINICAL_TEXT })));
      add.disabled = rows.children.length >= 26;
    };
    add.addEventListener("click", () => { addRow(""); rows.lastChild.querySelector("input").focus(); });
    // Enter in an option goes on to the next one, adding one after a filled last option: it never sends a question
    // with the options typed so far (Ctrl+Enter sends).
    rows.addEventListener("keydown", (e) => {
      if (e.key !== "Enter" || e.isComposing || e.ctrlKey || e.metaKey || e.target.tagName !== "INPUT") return;
      e.preventDefault();
      e.stopPropagation();
      const row = e.target.closest(".option");
      if (!row.nextElementSibling && e.target.value.trim() && !add.disabled) addRow("");
      if (row.nextElementSibling) row.nextElementSibling.querySelector("input").focus();
    });
    for (let i = 0; i < 4; i++) addRow("");
    set.append(rows, add);
    return set;
  }

  function fillExample() {
    const t = state.templates[$("mode").value];
    if (!t) return;
    for (const f of t.fields) {
      const value = t.example[f.name];
      if (value === undefined) continue;
      if (f.kind === "options") {
        const rows = $(fieldId(f.name)).querySelector(".option-rows");  // by id: a name may hold any character
        const inputs = rows.querySelectorAll("input");
        Object.values(value).forEach((text, i) => { if (inputs[i]) inputs[i].value = String(text); });
      } else {
        $(fieldId(f.name)).value = String(value);
      }
    }
  }

  function formInputs(t) {
    const inputs = {};
    for (const f of t.fields) {
      if (f.kind === "options") {
        const options = {};
        for (const input of $(fieldId(f.name)).querySelectorAll("input")) {
          if (input.value.trim()) options[input.dataset.letter] = input.value.trim();
        }
        inputs[f.name] = options;
      } else {
        const value = $(fieldId(f.name)).value;
        if (value.trim()) inputs[f.name] = value;
      }
    }
    return inputs;
  }

  // What stops a form from being sent, in plain words, and the control to fix it in (null when it can go): a required
  // field left empty, or a choice with fewer than two options. The server refuses both, in the words of the CLI.
  function formProblem(t, inputs) {
    for (const f of t.fields) {
      if (f.kind === "options") {
        const given = Object.keys(inputs[f.name] || {}).length;
        if (given < MIN_OPTIONS) {
          const boxes = [...$(fieldId(f.name)).querySelectorAll("input")];
          return { message: "Give at least " + MIN_OPTIONS + " options (" + given + " given): a question with " +
                            "fewer has nothing to choose between.",
                   control: boxes.find((box) => !box.value.trim()) || boxes[0] };
        }
      } else if (f.required && !(f.name in inputs)) {
        return { message: "Fill in “" + fieldLabel(f.name) + "” first: this form needs it.",
                 control: $(fieldId(f.name)) };
      }
    }
    return null;
  }

  // -- one answer on the page ---------------------------------------------------------------------------------
  // How a streamed answer ended (``stream`` returns the key) and what the page makes of it: the note under the answer
  // (and its data-done), the status line, a warning on the answer itself, the mark on the answer in the saved
  // transcript and on Copy, whether there is an answer at all, and whether the turn goes back to the model as the
  // conversation so far: an answer that arrived whole does, and so does one cut at the answer length, as it stands
  // (the clinician read it, told it was cut, and may ask the model to go on: the model's context is what was shown,
  // as in `edgemed chat`); one the clinician read part of (stopped, cut off, failed: history "marked") goes back with
  // its mark, as on Copy (see send); a turn with nothing the model could read does not, and a line under it says so.
  const ASK_AGAIN_LONGER = "the reasoning reached the answer length limit; ask again with a larger answer length";
  const CONTEXT_FULL = "the conversation filled the model's context";
  const QUESTION_FULL = "the question filled the model's context";
  const LENGTH_CUT = "cut at the answer length limit";
  const ENDINGS = {
    done: { note: "", status: "Answered.", history: true },
    // never "Answered": a clinician reads that as the whole answer
    length: { note: LENGTH_CUT, mark: "CUT AT THE ANSWER LENGTH",
              status: "Incomplete answer: it was cut at the answer length limit. Ask the model to go on, or raise " +
                      "“Longest answer (tokens)” and ask again.",
              warn: "Cut at the answer length limit: what is shown is incomplete, and stays in the conversation as " +
                    "it stands. Ask the model to go on, or raise the answer length.",
              history: true },
    // a form's answer cut at the length asked for: the server reads no answer from it, whatever it holds so far
    formLength: { note: LENGTH_CUT + ": raise the answer length and send again", mark: "CUT AT THE ANSWER LENGTH",
                  status: "The answer was cut at the answer length limit: no answer was read from it. Raise the " +
                          "answer length, and send again.",
                  warn: "Cut at the answer length limit: what is shown is incomplete, and no answer was read from " +
                        "it. Raise the answer length, and send again." },
    // cut by the room the conversation left in the model's context, below the length asked for: a longer answer
    // length would not help, and the next question would not fit either
    full: { note: "cut off: " + CONTEXT_FULL, mark: "CUT OFF, incomplete", history: "marked",
            status: "The answer was cut off: " + CONTEXT_FULL + ". Save it, then start a New conversation.",
            warn: "The answer was cut off because " + CONTEXT_FULL + ": what is shown is incomplete. Save the " +
                  "conversation, then start a New conversation." },
    thinkingFull: { note: "no answer: " + CONTEXT_FULL, noAnswer: true,
                    status: "No answer: " + CONTEXT_FULL + " during the reasoning. Save it, then start a New " +
                            "conversation.",
                    warn: "No answer: " + CONTEXT_FULL + " during the reasoning. Save the conversation, then start a " +
                          "New conversation." },
    // the same, on the first question of a conversation: a new conversation would fill the same way
    questionFull: { note: "cut off: " + QUESTION_FULL, mark: "CUT OFF, incomplete",
                    status: "The answer was cut off: the question left the model too little room. Shorten it, and " +
                            "send again.",
                    warn: "The answer was cut off because " + QUESTION_FULL + ": what is shown is incomplete. " +
                          "Shorten the question, and send again." },
    thinkingQuestionFull: { note: "no answer: " + QUESTION_FULL, noAnswer: true,
                            status: "No answer: " + QUESTION_FULL + " during the reasoning. Shorten it, and send " +
                                    "again.",
                            warn: "No answer: " + QUESTION_FULL + " during the reasoning. Shorten the question, and " +
                                  "send again." },
    formFull: { note: "cut off: the form's text filled the model's context", mark: "CUT OFF, incomplete",
                status: "The answer was cut off: the form's text left the model too little room. Shorten it, and " +
                        "send again.",
                warn: "The answer was cut off because the form's text filled the model's context: what is shown is " +
                      "incomplete. Shorten the text, and send again." },
    // a form's answer the server could not read by the form's contract: the text is shown, never as the answer
    unformatted: { note: "not in the form's format", mark: "NOT IN THE FORM'S FORMAT",
                   status: "The answer did not follow the form's format: no answer was read from it. Ask again.",
                   warn: "Not in the form's format: no answer was read from this reply. Check its text before using " +
                         "any of it, or ask again." },
    cut: { note: "cut off: the answer stopped before its end; ask again", mark: "CUT OFF, incomplete",
           history: "marked",
           status: "The answer was cut off before its end; ask again.",
           warn: "The answer was cut off before its end: what is shown is incomplete. Ask again." },
    thinking: { note: "no answer: the model gave no answer outside its reasoning; ask again", noAnswer: true,
                status: "The model gave no answer outside its reasoning; ask again.",
                warn: "The model gave no answer outside its reasoning; ask again." },
    thinkingLength: { note: "no answer: " + ASK_AGAIN_LONGER, noAnswer: true,
                      status: "No answer: " + ASK_AGAIN_LONGER + ".", warn: "No answer: " + ASK_AGAIN_LONGER + "." },
    empty: { note: "no answer: the answer was empty; ask again", noAnswer: true,
             status: "The model gave an empty answer; ask again.", warn: "The model gave an empty answer; ask again." },
    stopped: { note: "stopped", mark: "STOPPED, incomplete", status: "Stopped: the answer is incomplete.",
               history: "marked",
               warn: "Stopped: what is shown is incomplete." },
    // the server sent an error after some of the answer
    failed: { note: "failed: the answer stopped before its end; ask again", mark: "FAILED, incomplete",
              history: "marked",
              status: "The answer failed before its end; see the message, and ask again.",
              warn: "The answer failed before its end: what is shown is incomplete." },
    error: { note: "error", status: "The answer failed; see the message.", noAnswer: true },
    // a finish reason other than stop or length (a content filter's, tool calls: this server sends neither to the
    // page): the server did not say the answer is whole; the note names the reason
    ended: { note: "ended early, not as a whole answer", mark: "ENDED EARLY, may be incomplete", history: "marked",
             status: "The answer ended early: what is shown may be incomplete. Ask again.",
             warn: "The answer ended early, not as a whole answer: what is shown may be incomplete. Ask again." },
  };

  function addTurn(question) {
    const answer = el("article", { class: "answer", "aria-label": "Answer" });
    const warn = el("p", { class: "error ending", role: "alert", hidden: true });
    const think = el("details", { class: "think", hidden: true },
                     el("summary", { text: "Reasoning (folded; not part of the answer)" }), el("pre", { class: "think-text" }));
    const text = el("div", { class: "answer-text" });
    const structured = el("div", { class: "structured", hidden: true });
    const raw = el("details", { class: "raw", hidden: true }, el("summary", { text: "Raw text" }), el("pre", { class: "raw-text" }));
    const meta = el("p", { class: "meta" });
    // off until the answer has ended (finishTurn): text still being written is no answer to paste
    const copy = el("button", { type: "button", class: "copy", text: "Copy answer", disabled: "" });
    const safety = el("p", { class: "safety", text: (state.info && state.info.safety) || "" });
    answer.append(warn, think, structured, text, raw, el("div", { class: "answer-foot" }, copy, meta), safety);
    const item = el("li", { class: "turn" }, el("div", { class: "question" }, el("span", { class: "who", text: "You" }),
                                                 el("div", { class: "question-text", text: question })), answer);
    $("log").append(item);
    $("conversation").hidden = false;
    item.scrollIntoView({ block: "nearest" });
    const turn = { item, answer, warn, think, text, structured, raw, meta, copy,
                   answerText: "", thinkText: "", requestId: "", ending: "", parsed: null, usage: null, error: "" };
    copy.addEventListener("click", () => copyText(turn));
    return turn;
  }

  // Change the answer on screen with ``change``, and keep its end in view if it was in view before (the reader is
  // following it): a reader who scrolled up to read is left where they are.
  function following(turn, change) {
    const before = turn.answer.getBoundingClientRect().bottom;
    change();
    if (before > window.innerHeight + 2) return;
    const after = turn.answer.getBoundingClientRect().bottom;
    if (after > window.innerHeight) window.scrollBy(0, after - window.innerHeight);
  }

  function showPiece(turn, inThink, text) {
    if (!text) return;
    following(turn, () => {
      if (inThink) {
        turn.thinkText += text;
        turn.think.hidden = false;
        turn.think.querySelector(".think-text").textContent = shown(turn.thinkText);
      } else {
        turn.answerText += text;
        turn.text.textContent = shown(turn.answerText.replace(/^\s+/, ""));
      }
    });
  }

  function showStructured(turn, template, edgemed, finish) {
    const parsed = edgemed && edgemed.parsed;
    if (!template || !parsed) return;
    turn.parsed = parsed;
    following(turn, () => structure(turn, template, parsed, finish));
  }

  function structure(turn, template, parsed, finish) {
    const box = turn.structured;
    box.replaceChildren();
    // cut (at the answer length, or by the context): not a reply in the wrong format; the warning says why and what to
    // do (the server's own fix names its API's max_tokens, not the page's answer length)
    if (!parsed.ok && finish === "length") {
      box.append(el("p", { class: "error", text: "No answer was read: the answer was cut off before its end. " +
                                                 "The model's text is shown below." }));
      box.hidden = false;
      return;
    }
    if (!parsed.ok) {
      box.append(el("p", { class: "error", text: "The answer did not follow the form's format: " + (parsed.error || "unknown") +
                                                 ". The model's text is shown below." }));
      box.hidden = false;
      return;
    }
    if (template.kind === "choice") {
      const options = (turn.inputs && template.choices_from && turn.inputs[template.choices_from]) || {};
      const chosen = String(parsed.value);
      box.append(el("p", { class: "choice" }, el("span", { text: (template.label || "Answer") + ": " }),
                    el("strong", { class: "choice-letter", text: chosen }),
                    options[chosen] ? el("span", { class: "choice-text", text: " — " + options[chosen] }) : null));
    } else if (template.kind === "json" && parsed.value && typeof parsed.value === "object") {
      box.append(jsonTable(parsed.value, template.columns));
    } else {
      return;  // a text contract: the answer text is the answer
    }
    box.hidden = false;
    turn.text.hidden = true;  // the raw text is one click away
    turn.raw.hidden = false;
    turn.raw.querySelector(".raw-text").textContent = shown(turn.answerText);
  }

  function jsonTable(value, columns) {
    const keys = [...(columns || []).filter((k) => k in value), ...Object.keys(value).filter((k) => !(columns || []).includes(k))];
    const body = el("tbody");
    for (const k of keys) {
      const v = value[k];
      const cell = el("td");
      if (Array.isArray(v)) cell.append(v.length ? el("ul", {}, ...v.map((x) => el("li", { text: typeof x === "string" ? x : JSON.stringify(x) })))
                                                   : el("span", { class: "none", text: "none" }));
      else cell.textContent = shown(typeof v === "string" ? v : JSON.stringify(v));
      body.append(el("tr", {}, el("th", { scope: "row", text: k.replace(/_/g, " ") }), cell));
    }
    return el("table", { class: "json" }, el("caption", { text: "Structured answer" }), body);
  }

  function finishTurn(turn, ending) {
    const end = ENDINGS[ending];
    following(turn, () => {
      const parts = [];
      const id = turn.requestId && el("code", { class: "request-id", text: turn.requestId });
      if (turn.model) parts.push(el("span", {}, "Model ", el("code", { class: "model", text: turn.model })));
      if (id) parts.push(el("span", {}, "Request id ", id));
      if (end.note) parts.push(el("span", { class: "note", text: note(turn, end) }));
      turn.meta.replaceChildren(...parts.flatMap((p, i) => (i ? [" · ", p] : [p])));
      if (end.warn) { turn.warn.textContent = end.warn; turn.warn.hidden = false; }
    });
    // no answer to copy: never an empty one pasted as the answer
    turn.copy.disabled = Boolean(end.noAnswer) || !turn.answerText.trim();
    turn.ending = ending;
    turn.answer.dataset.done = note(turn, end) || "done";
  }

  // The note under an answer; one that ended early names the server's finish reason.
  function note(turn, end) {
    return end === ENDINGS.ended ? end.note + " (finish reason: " + turn.finish + ")" : end.note;
  }

  // Copy gives the answer with its mark when it is not a whole answer (cut off, cut at the answer length, stopped,
  // failed, not in the form's format), and is off while the answer is still being written; where the clipboard is
  // refused, the selection made instead starts at the warning above the answer.
  async function copyText(turn) {
    const mark = (ENDINGS[turn.ending] || {}).mark;
    try {
      await navigator.clipboard.writeText(shown(marked(turn)));
      turn.copy.textContent = "Copied";
    } catch (e) {
      const range = document.createRange();
      range.selectNodeContents(turn.text.hidden ? turn.raw.querySelector(".raw-text") : turn.text);
      if (mark && !turn.warn.hidden) range.setStartBefore(turn.warn);
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      turn.copy.textContent = "Selected: press Ctrl+C";
    }
  }

  // The answer with its mark, as Copy gives it and as a stopped or broken answer goes back to the model.
  function marked(turn) {
    const mark = (ENDINGS[turn.ending] || {}).mark;
    return (mark ? "[" + mark + "] " : "") + turn.answerText.trim();
  }

  // -- asking -------------------------------------------------------------------------------------------------
  function busy(on) {
    $("send").disabled = on;
    $("stop").disabled = !on;
    $("mode").disabled = on;
  }

  // The answer length asked for: null when the box is empty (the server's default), NaN when it holds anything but
  // a whole number of 1 or more. The browser's own number: parseInt read "1e2" as 1 and "2.5" as 2, and "0" and "-5"
  // were dropped without a word for the server's default.
  function answerLength() {
    const box = $("max-tokens");
    if (box.value === "" && !box.validity.badInput) return null;
    const n = box.valueAsNumber;
    return Number.isInteger(n) && n >= 1 ? n : NaN;
  }

  async function send() {
    if (state.busy) { setStatus("An answer is still coming: wait, or press Stop."); return; }
    const t = state.templates[$("mode").value];
    // usage (the prompt's and the answer's tokens) tells an answer cut by the room left in the context from one cut
    // at the length asked for
    const body = { model: $("model").value, stream: true, stream_options: { include_usage: true } };
    const max = answerLength();
    if (Number.isNaN(max)) {
      setStatus("Longest answer (tokens): give a whole number of 1 or more, or leave it empty for the server's " +
                "default.");
      $("max-tokens").focus();
      return;
    }
    if (max) body.max_tokens = max;
    let question, inputs = null;
    if (t) {
      inputs = formInputs(t);
      const problem = formProblem(t, inputs);
      if (problem) { setStatus(problem.message); problem.control.focus(); return; }
      body.template = t.name;
      body.template_inputs = inputs;
      question = t.title + "\n" + Object.entries(inputs).map(([k, v]) =>
        k.replace(/_/g, " ") + ": " + (typeof v === "object" ? Object.entries(v).map(([l, o]) => "\n  " + l + ". " + o).join("") : v)).join("\n");
    } else {
      question = $("prompt").value.trim();
      if (!question) { setStatus("Type a question first."); $("prompt").focus(); return; }
      // the safety preamble first, as `edgemed chat` sends it (the server's text; a form's template has its own)
      body.messages = [{ role: "system", content: state.info.preamble }, ...state.history,
                       { role: "user", content: question }];
    }
    const before = state.transcript[state.transcript.length - 1];
    if (before && before.model !== body.model) {
      $("log").append(el("li", { class: "divider", role: "note", text: modelChange(body.model, before.model) }));
    }
    const turn = addTurn(question);
    turn.model = body.model;
    turn.inputs = inputs;
    turn.asked = max || 0;
    turn.first = !t && state.history.length === 0;  // the model reads this question alone: shortening it is the fix
    const conversation = state.conversation;
    const current = () => conversation === state.conversation;
    const controller = new AbortController();
    state.busy = controller;
    busy(true);
    setStatus("Answering…");
    let ending = "error";
    try {
      ending = await stream(body, turn, t, controller.signal);
    } catch (e) {
      if (e.name === "AbortError") ending = "stopped";
      else { ending = "error"; showError(turn, "The request failed: " + e.message); }
    } finally {
      if (ending === "error" && turn.answerText.trim()) ending = "failed";  // some of it came: it is incomplete
      state.busy = null;
      busy(false);
      finishTurn(turn, ending);
      if (current()) {
        const end = ENDINGS[ending];
        // What is on screen as one conversation is what the model is sent next: a clinician who read part of an
        // answer (stopped, cut off, failed) and asks "and for her?" means the patient of the question above. So the
        // question and what came of its answer go back, marked as on Copy ("[STOPPED, incomplete] ..."); a turn
        // with nothing the model could read (an error, no answer) is left out, and a line under it says so.
        const kept = !t && end.history && turn.answerText.trim() !== "";
        if (kept) {
          const answer = end.history === "marked" ? marked(turn) : turn.answerText.trim();
          state.history.push({ role: "user", content: question }, { role: "assistant", content: answer });
          // a question typed while the answer came is the clinician's next one: it stays; after an incomplete answer
          // the question stays too (asking again is one key press)
          if (end.history === true && $("prompt").value.trim() === question) $("prompt").value = "";
        }
        if (t) formDivider(turn);
        else if (!kept) turn.item.after(el("li", { class: "divider", role: "note", text: LEFT_OUT }));
        state.transcript.push({ question, answer: turn.answerText.trim(), reasoning: turn.thinkText.trim(),
                                requestId: turn.requestId, ending, error: turn.error,
                                detail: turn.errorDetail, form: Boolean(t),
                                left: !t && !kept, model: body.model });
        setStatus(end.status, { warn: ending !== "done" });
        (t ? $("send") : $("prompt")).focus({ preventScroll: true });
      }
      if (turn.refused !== undefined) signOut(turn.refused);
    }
  }

  // ``detail``: the server's own words (they name the operator's flags and fixes), folded under the clinician's.
  function showError(turn, message, detail) {
    turn.error = message;
    turn.errorDetail = detail && detail !== message ? detail : "";
    following(turn, () => {
      turn.structured.replaceChildren(el("p", { class: "error", role: "alert", text: message }),
                                      turn.errorDetail ? technical(turn.errorDetail) : null);
      turn.structured.hidden = false;
    });
  }

  // The model sees the chat's own turns only (``state.history``), never a form's question and answer: a line after
  // the last form answer says so, before a free question is asked as if the model had read it.
  const FORM_DIVIDER = "The model does not see the form answers above: a free question is answered from the chat alone.";

  function formDivider(turn) {
    const before = turn.item.previousElementSibling;
    if (before && before.textContent === FORM_DIVIDER) before.remove();  // one line, after the last of them
    turn.item.after(el("li", { class: "divider", role: "note", text: FORM_DIVIDER }));
  }

  // A chat question the model was not sent back (an error, no answer it could read): the next is answered without it.
  const LEFT_OUT = "The model does not see the question above: the next question is answered without it. To " +
                   "include it, send it again.";

  // The model picker changed within a conversation: a line says the answers below are another model's (or adapter's)
  // than those above, on screen and in the saved transcript; each answer names its own model besides.
  function modelChange(model, before) {
    return "Model changed to " + model + ": the answers below are its own, those above came from " + before + ".";
  }

  function technical(detail) {
    return el("details", { class: "detail" }, el("summary", { text: "Technical detail (for IT)" }),
              el("p", { text: detail }));
  }

  // The refusals a clinician can meet, in their words: the server's own name the operator's flags (--slots,
  // --max-body) and its API's fields; they are kept as the technical detail.
  const UNREACHABLE = "The server cannot be reached (it may have been stopped): send again when it is back.";
  const ASK_IT = "if it happens again, contact IT or whoever runs the assistant";
  const FAILED = "The model failed while answering: ask again; " + ASK_IT + ", with the request id.";
  const TOO_LARGE = "This text is too long to send: shorten it, and send again.";
  // A 401: the page holds no key the server takes (none given, or one changed or withdrawn since it was given).
  const NOT_SIGNED_IN = "This page is not signed in to the server: ask your IT contact for the API key, and enter " +
                        "it here.";
  const KEY_REFUSED = "The key was refused (it may have been changed or withdrawn): enter the current key; ask your " +
                      "IT contact for it if you do not have it.";

  function keyWords() { return apiKey() ? KEY_REFUSED : NOT_SIGNED_IN; }

  function busyWords(response) {
    const wait = parseInt(response && response.headers.get("retry-after"), 10);
    return "The model is busy with other questions: send again " +
           (wait > 0 ? "in about " + wait + " s." : "in a moment.");
  }

  // ``response``: the refusal's, for its status and Retry-After (null for an error event in the stream); ``model``:
  // the one asked. A refusal whose code the page does not know, or that has none (a proxy's bare status, a check
  // before the model), is said by its status: never in the server's words, which are the technical detail.
  function inWords(error, response, model) {
    if (error.code === "model_not_found") {
      // an adapter (a specialty's model) removed from the server since the page listed it
      return "The model chosen for this question (" + model + ") is no longer available on this server: pick " +
             "another under “Model”, or reload the page to see the models available now.";
    }
    if (error.code === "no_token_allowed" || error.code === "grammar_too_costly") {
      return "The model could not write an answer in the required format: ask again; " + ASK_IT + ".";
    }
    if (error.code === "generation_failed" || error.code === "server_error") return FAILED;
    if (error.code === "server_overloaded") return busyWords(response);
    if (error.code === "unavailable") {
      return "The model is not answering now (the server may be stopping or restarting): send again in a moment.";
    }
    if (error.code === "request_too_large") return TOO_LARGE;
    if (error.code === "max_tokens_too_large") {
      return "The answer length asked for is above this server's limit: lower “Longest answer (tokens)”, or leave " +
             "it empty, and send again.";
    }
    const status = response ? response.status : 0;
    if (status === 401) return keyWords();
    if (status === 403) {
      return "The server does not allow this page to ask it questions: contact IT or whoever runs the assistant, " +
             "with the request id.";
    }
    if (status === 413) return TOO_LARGE;
    if (status === 429) return busyWords(response);
    if (status >= 400 && status < 500) {
      return "The server did not accept this question as the page sent it: send it again; " + ASK_IT +
             ", with the request id.";
    }
    if (status >= 500) {
      return "The server could not answer this question: send it again in a moment; " + ASK_IT +
             ", with the request id.";
    }
    return FAILED;  // an error event in the stream, of a code the page does not know
  }

  // POST with stream: true; read the SSE events; returns how the answer ended, a key of ENDINGS. The answer is whole
  // only once a finish_reason or [DONE] arrives: a body that ends without either (a server that failed and closed
  // between two events; Firefox and some proxies end the body normally then) is cut off, whatever it held, and so is
  // one whose reading fails after the headers (Chromium's TypeError for a connection dropped mid-body).
  async function stream(body, turn, template, signal) {
    let response;
    try {
      response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(true), body: JSON.stringify(body), signal, cache: "no-store",
      });
    } catch (e) {
      if (signal.aborted) throw e;  // Stop
      showError(turn, UNREACHABLE);  // a fetch fails with a bare TypeError ("Failed to fetch") when no server answers
      return "error";
    }
    turn.requestId = response.headers.get("x-request-id") || "";
    if (!response.ok) {
      const error = await errorOf(response);
      const tooLong = error.code === "context_length_exceeded"
        ? (template ? FORM_TOO_LONG : turn.first ? QUESTION_TOO_LONG : TOO_LONG) : "";
      showError(turn, tooLong || inWords(error, response, turn.model), error.message);
      if (response.status === 401) turn.refused = error.message;  // signed out once the turn is closed
      return "error";
    }
    const split = window.EdgemedThink.splitter(response.headers.get("x-edgemed-think") === "open");
    const out = (inThink, text) => showPiece(turn, inThink, text);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", finish = "", failed = false;
    for (;;) {
      let read;
      try {
        read = await reader.read();
      } catch (e) {
        if (signal.aborted) throw e;  // Stop
        split.flush(out);
        return "cut";
      }
      const { value, done } = read;
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") { finish = finish || "stop"; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) {
          showError(turn, inWords(chunk.error, null, turn.model), chunk.error.message);
          failed = true;
          continue;
        }
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) split.feed(choice.delta.content, out);
          if (choice.finish_reason) {
            split.flush(out);
            finish = choice.finish_reason;
          }
        }
        if (chunk.edgemed) showStructured(turn, template, chunk.edgemed, finish);
        if (chunk.usage) turn.usage = chunk.usage;
      }
    }
    split.flush(out);
    if (failed) return "error";
    if (!finish) return "cut";
    if (finish === "length" && filledTheContext(turn)) {
      if (template) return "formFull";
      if (turn.first) return split.thinking() ? "thinkingQuestionFull" : "questionFull";
      return split.thinking() ? "thinkingFull" : "full";
    }
    if (split.thinking()) return finish === "length" ? "thinkingLength" : "thinking";  // whatever the finish reason
    if (finish === "length") return template ? "formLength" : "length";  // a form's cut reply is read as no answer
    if (finish !== "stop") { turn.finish = finish; return "ended"; }
    if (template && turn.parsed && !turn.parsed.ok && turn.answerText.trim()) return "unformatted";
    return turn.answerText.trim() ? "done" : "empty";
  }

  // An answer cut at ``length`` below the length the clinician asked for, whose prompt and answer fill the context
  // (the server caps an answer to the room the prompt leaves): the conversation, not the answer length, is too long.
  function filledTheContext(turn) {
    const u = turn.usage, room = state.info && state.info.context_length;
    if (!u || !room || u.prompt_tokens + u.completion_tokens < room) return false;
    return !turn.asked || u.completion_tokens < turn.asked;
  }

  function stop() { if (state.busy) state.busy.abort(); }

  function clearConversation() {
    stop();
    state.conversation += 1;
    state.history = [];
    state.transcript = [];
    $("log").replaceChildren();
    $("conversation").hidden = true;
  }

  function newConversation() {
    clearConversation();
    setStatus("New conversation.");
    $("prompt").focus();
  }

  // One question and its answer in the saved transcript. An answer cut off says so on its own line; where there is
  // no answer the line says that, and any reasoning the model wrote follows under its own label, never as the answer.
  function transcriptLines(entry) {
    const end = ENDINGS[entry.ending];
    const none = end.noAnswer || !entry.answer;
    const lines = ["Q: " + entry.question,
                   none ? "A: none. " + (entry.error || end.warn || end.status) +
                          (entry.detail ? " (Technical detail: " + entry.detail + ")" : "")
                        : (end.mark ? "A (" + end.mark + "): " : "A: ") + entry.answer];
    if (entry.reasoning && !entry.answer) lines.push("Reasoning (not an answer): " + entry.reasoning);
    lines.push("Request id: " + (entry.requestId || "none") + ", model " + entry.model +
               (end.note ? " (" + end.note + ")" : ""), "");
    return lines;
  }

  // The saved transcript's head: what the model read before each question, which the transcript does not repeat.
  const PREAMBLE_SENT = "Each question went to the model after edgemed's safety preamble (its medical system " +
                        "message); a form's after its template's own.";

  // The saved text, with each bidi control escaped as on screen (``shown``): the file reads as the page did. Its head
  // names the models that answered in it, each answer its own: the picker may have changed between them.
  function exportConversation() {
    if (!state.transcript.length) { setStatus("Nothing to save yet."); return; }
    const models = [...new Set(state.transcript.map((entry) => entry.model))];
    const lines = ["edgemed conversation — model" + (models.length > 1 ? "s " : " ") + models.join(", "),
                   new Date().toISOString(), PREAMBLE_SENT, ""];
    state.transcript.forEach((entry, i) => {
      const before = state.transcript[i - 1];
      if (before && before.model !== entry.model) lines.push("(" + modelChange(entry.model, before.model) + ")", "");
      lines.push(...transcriptLines(entry));
      const next = state.transcript[i + 1];
      if (entry.form && !(next && next.form)) lines.push("(" + FORM_DIVIDER + ")", "");
      if (entry.left) lines.push("(" + LEFT_OUT + ")", "");
    });
    lines.push(state.info ? state.info.safety : "");
    const url = URL.createObjectURL(new Blob([shown(lines.join("\n"))], { type: "text/plain;charset=utf-8" }));
    const a = el("a", { href: url, download: "edgemed-conversation.txt" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  // -- wiring -------------------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("key").value.trim();
      if (!key) return;
      $("key").value = "";
      const problem = keyProblem(key);
      if (problem) { askForKey(problem, "That key cannot be used: paste it again."); return; }
      heldKey = key;
      load();
    });
    $("forget-key").addEventListener("click", () => signOut());
    $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
    $("template-form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    $("template-form").addEventListener("keydown", (e) => {
      if (e.key !== "Enter" || e.isComposing) return;
      const inText = e.target.tagName === "TEXTAREA";
      if ((inText && (e.ctrlKey || e.metaKey)) || (!inText && e.target.tagName === "INPUT")) { e.preventDefault(); send(); }
    });
    $("mode").addEventListener("change", () => showMode($("mode").value));
    $("fill-example").addEventListener("click", fillExample);
    $("send").addEventListener("click", send);
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newConversation);
    $("export").addEventListener("click", exportConversation);
    load();
  });
})();
