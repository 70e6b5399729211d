// How the clinician page splits a streamed answer into reasoning (folded away) and the answer itself. Its own file,
// so a test can drive it in the browser with pieces of text a model would rarely write on cue.
"use strict";

window.EdgemedThink = (function () {
  const THINK_OPEN = "<think>", THINK_CLOSE = "</think>";

  // <think>…</think> split as it streams, a tag possibly cut between two pieces (as templates/think.py does). Only a
  // block before the answer's first word is reasoning: one the chat template opened (``opened``, from the response's
  // x-edgemed-think header) or one the model opens first thing. A tag anywhere later is text of the answer, shown.
  function splitter(opened) {
    let inThink = opened, answered = false, pending = "";
    const partial = (text, tag) => {
      for (let n = Math.min(tag.length - 1, text.length); n > 0; n--) if (tag.startsWith(text.slice(-n))) return n;
      return 0;
    };
    return {
      feed(piece, out) {
        pending += piece;
        while (pending) {
          if (answered) { out(false, pending); pending = ""; break; }
          const tag = inThink ? THINK_CLOSE : THINK_OPEN;
          const at = pending.indexOf(tag);
          const keep = at >= 0 ? 0 : partial(pending, tag);
          const before = at >= 0 ? pending.slice(0, at) : pending.slice(0, pending.length - keep);
          if (!inThink && before.trim()) { answered = true; continue; }  // the answer has begun: the rest is text
          out(inThink, before);
          if (at < 0) { pending = pending.slice(pending.length - keep); break; }
          pending = pending.slice(at + tag.length);
          inThink = !inThink;
        }
      },
      flush(out) { out(inThink, pending); pending = ""; },
      // Still inside the reasoning block: no </think> came after it, so there is no answer yet, whatever the reason
      // the stream ended for.
      thinking() { return inThink; },
    };
  }

  return { splitter };
})();
