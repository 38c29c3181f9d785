// courier's operator page. Every value from the server is put in the page as text
// (textContent): dead letters are hostile input. The token stays in this page's memory and
// goes out only as the Authorization header of same-origin requests.
"use strict";

(function () {
  let token = "";
  let lastCounters = null;
  let cursor = null;
  let pending = null;
  const $ = (id) => document.getElementById(id);

  function cell(row, value) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined ? "" : String(value);
    row.appendChild(td);
    return td;
  }

  function clear(tbody) {
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
  }

  function say(id, message, good) {
    const el = $(id);
    el.textContent = message;
    el.className = good ? "ok" : "error";
  }

  async function call(method, path, body) {
    const init = { method, headers: { Authorization: "Bearer " + token } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401) {
      say("auth-status", "wrong token (401)", false);
      throw new Error("401");
    }
    if (!response.ok) {
      const message = data && data.error ? data.error : "HTTP " + response.status;
      throw new Error(message);
    }
    return data;
  }

  function queueName() {
    return $("queue-select").value || "";
  }

  function filterText() {
    return {
      reason: $("f-reason").value.trim(),
      status: $("f-status").value.trim(),
      since: $("f-since").value.trim(),
      until: $("f-until").value.trim(),
      grep: $("f-grep").value,
    };
  }

  function query(extra) {
    const params = new URLSearchParams();
    const f = filterText();
    for (const key of Object.keys(f)) if (f[key]) params.set(key, f[key]);
    if (queueName()) params.set("queue", queueName());
    for (const key of Object.keys(extra || {})) params.set(key, extra[key]);
    return params.toString();
  }

  async function refreshStats() {
    const response = await fetch("/stats");
    const stats = await response.json();
    $("worker").textContent = stats.worker_id || "";
    $("circuit").textContent = stats.circuit || "?";
    const now = Date.now();
    const c = stats.counters || {};
    if (lastCounters) {
      const seconds = Math.max(0.001, (now - lastCounters.at) / 1000);
      $("rate-delivered").textContent = ((c.delivered - lastCounters.delivered) / seconds).toFixed(1);
      $("rate-failed").textContent = ((c.failed_attempts - lastCounters.failed_attempts) / seconds).toFixed(1);
    }
    lastCounters = { at: now, delivered: c.delivered || 0, failed_attempts: c.failed_attempts || 0 };
    const tbody = $("queues").tBodies[0];
    clear(tbody);
    const select = $("queue-select");
    const chosen = select.value;
    const detail = stats.queues_detail || [];
    if (select.options.length !== detail.length) {
      while (select.firstChild) select.removeChild(select.firstChild);
      for (const q of detail) {
        const option = document.createElement("option");
        option.value = q.queue;
        option.textContent = q.queue;
        select.appendChild(option);
      }
      if (chosen) select.value = chosen;
    }
    for (const q of detail) {
      const row = document.createElement("tr");
      row.dataset.queue = q.queue;
      cell(row, q.queue);
      cell(row, q.depths.ready);
      cell(row, q.depths.processing);
      cell(row, q.depths.retry);
      cell(row, q.depths.dead);
      tbody.appendChild(row);
    }
    const workers = $("workers").tBodies[0];
    clear(workers);
    for (const w of stats.workers || []) {
      const row = document.createElement("tr");
      cell(row, w.worker_id);
      cell(row, Number(w.heartbeat_age_seconds).toFixed(1) + " s");
      workers.appendChild(row);
    }
  }

  async function refreshGroups() {
    const params = new URLSearchParams();
    if (queueName()) params.set("queue", queueName());
    const data = await call("GET", "/dlq/stats?" + params.toString());
    const tbody = $("groups").tBodies[0];
    clear(tbody);
    for (const g of data.groups) {
      const row = document.createElement("tr");
      cell(row, g.count);
      cell(row, g.reason);
      cell(row, g.status);
      cell(row, g.error);
      cell(row, g.oldest);
      cell(row, g.newest);
      const td = document.createElement("td");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = "Show";
      button.className = "show-group";
      button.addEventListener("click", () => {
        $("f-reason").value = g.reason;
        $("f-status").value = g.status === null ? "" : String(g.status);
        $("f-since").value = "";
        $("f-until").value = "";
        $("f-grep").value = "";
        loadLetters(false).catch(report);
      });
      td.appendChild(button);
      row.appendChild(td);
      tbody.appendChild(row);
    }
  }

  async function loadLetters(more) {
    const extra = { limit: "50" };
    if (more && cursor) extra.cursor = String(cursor);
    const data = await call("GET", "/dlq?" + query(extra));
    const tbody = $("letters").tBodies[0];
    if (!more) clear(tbody);
    for (const letter of data.items) {
      const row = document.createElement("tr");
      row.dataset.position = String(letter.position);
      const pick = document.createElement("td");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.className = "pick";
      if (letter.message_id === undefined) box.disabled = true;
      else box.dataset.id = letter.message_id;
      box.addEventListener("click", (event) => event.stopPropagation());
      pick.appendChild(box);
      row.appendChild(pick);
      cell(row, letter.message_id === undefined ? "(no message_id)" : letter.message_id);
      cell(row, letter.reason);
      cell(row, letter.status);
      cell(row, letter.dead_at);
      cell(row, letter.error);
      row.addEventListener("click", () => showLetter(letter.position).catch(report));
      tbody.appendChild(row);
    }
    cursor = data.next_cursor;
    $("more").hidden = !cursor;
    $("list-summary").textContent = tbody.rows.length + " shown of " + data.total + " dead letter(s)";
  }

  async function showLetter(position) {
    const params = new URLSearchParams({ position: String(position) });
    if (queueName()) params.set("queue", queueName());
    const letter = await call("GET", "/dlq/letter?" + params.toString());
    $("letter").textContent = JSON.stringify(letter, null, 2);
  }

  function selectedIds() {
    return Array.from(document.querySelectorAll("input.pick:checked")).map((b) => b.dataset.id);
  }

  // Asks the server what would be acted on (a dry run), then shows the count for confirming.
  async function prepare(action, selection) {
    const body = { dry_run: true, queue: queueName() };
    if (selection) {
      const ids = selectedIds();
      if (ids.length === 0) { say("result", "select dead letters first", false); return; }
      body.ids = ids;
    } else {
      const f = filterText();
      const empty = !f.reason && !f.status && !f.since && !f.until && !f.grep;
      if (empty) body.all = true; else body.filter = f;
    }
    body.front = $("front").checked;
    const data = await call("POST", "/dlq/" + action, body);
    const n = data.outcome.matched;
    pending = Object.assign({}, body, { dry_run: false, action });
    const verb = action === "requeue" ? "Requeue" : "Permanently delete";
    $("confirm-text").textContent = verb + " " + n + " dead letter(s)" +
      (action === "requeue" ? (body.front ? " to the front of " : " to the back of ") + (queueName() || "the queue") : "") + "?";
    $("confirm").hidden = false;
  }

  async function confirmAction() {
    if (!pending) return;
    const body = Object.assign({}, pending);
    const action = body.action;
    delete body.action;
    pending = null;
    $("confirm").hidden = true;
    const data = await call("POST", "/dlq/" + action, body);
    const o = data.outcome;
    say("result", (action === "requeue" ? "requeued " : "deleted ") + o.done + " of " + o.matched +
      (o.changed ? " (" + o.changed + " changed meanwhile)" : ""), true);
    await Promise.all([refreshStats(), refreshGroups(), loadLetters(false)]);
  }

  function report(error) {
    if (error && error.message !== "401") say("result", String(error.message || error), false);
  }

  async function connect() {
    token = $("token").value;
    $("auth-status").textContent = "";
    try {
      await refreshGroups();
      say("auth-status", "connected", true);
      await loadLetters(false);
    } catch (e) {
      report(e);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("connect").addEventListener("click", connect);
    $("token").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
    $("apply").addEventListener("click", () => loadLetters(false).catch(report));
    $("clear").addEventListener("click", () => {
      for (const id of ["f-reason", "f-status", "f-since", "f-until", "f-grep"]) $(id).value = "";
      loadLetters(false).catch(report);
    });
    $("more").addEventListener("click", () => loadLetters(true).catch(report));
    $("queue-select").addEventListener("change", () => { refreshGroups().catch(report); loadLetters(false).catch(report); });
    $("requeue-filter").addEventListener("click", () => prepare("requeue", false).catch(report));
    $("purge-filter").addEventListener("click", () => prepare("purge", false).catch(report));
    $("requeue-selected").addEventListener("click", () => prepare("requeue", true).catch(report));
    $("purge-selected").addEventListener("click", () => prepare("purge", true).catch(report));
    $("confirm-yes").addEventListener("click", () => confirmAction().catch(report));
    $("confirm-no").addEventListener("click", () => { pending = null; $("confirm").hidden = true; });
    refreshStats().catch(() => {});
    setInterval(() => refreshStats().catch(() => {}), 5000);
  });
})();
