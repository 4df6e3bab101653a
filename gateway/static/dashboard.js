// The vmkg dashboard: polls dashboard/api/kernels and draws the kernels as a tree by
// lineage; Fork and Delete post with the page's CSRF token. DOM built with textContent
// only (kernel data never becomes markup).
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="vmkg-csrf"]').content;
  const tbody = document.querySelector("#kernels tbody");
  const empty = document.getElementById("empty");
  const status = document.getElementById("status");
  const POLL_MS = 2000;
  let confirming = null; // id of the kernel whose Delete waits for a second click
  let confirmTimer = null;
  let last = null;

  function say(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function mb(bytes) {
    return (bytes / 1048576).toFixed(bytes < 10485760 ? 1 : 0) + " MB";
  }

  function ago(iso, now) {
    if (!iso) return "-";
    const t = Date.parse(iso);
    return isNaN(t) ? "-" : duration(now - t / 1000) + " ago";
  }

  // depth-first order: roots (no parent, or a parent this user cannot see), then branches
  function ordered(kernels) {
    const ids = new Set(kernels.map((k) => k.id));
    const children = new Map();
    const roots = [];
    for (const k of kernels) {
      if (k.parent_id && ids.has(k.parent_id)) {
        if (!children.has(k.parent_id)) children.set(k.parent_id, []);
        children.get(k.parent_id).push(k);
      } else {
        roots.push(k);
      }
    }
    const out = [];
    const walk = (k, depth) => {
      out.push([k, depth]);
      for (const c of children.get(k.id) || []) walk(c, depth + 1);
    };
    for (const r of roots) walk(r, 0);
    return out;
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function button(label, cls, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }

  function render(data) {
    last = data;
    const rows = ordered(data.kernels);
    tbody.replaceChildren();
    empty.hidden = rows.length > 0;
    for (const [k, depth] of rows) {
      const tr = document.createElement("tr");
      tr.dataset.id = k.id;
      tr.dataset.parent = k.parent_id || "";
      tr.dataset.depth = String(depth);
      const idCell = cell(tr, "", "id");
      idCell.style.paddingLeft = (0.6 + depth * 1.6) + "em";
      if (depth > 0) {
        const mark = document.createElement("span");
        mark.className = "branch";
        mark.textContent = "\u2514 ";
        idCell.appendChild(mark);
      }
      const code = document.createElement("code");
      code.textContent = k.id;
      code.title = k.parent_id ? "forked from " + k.parent_id + " at " + k.forked_at : "";
      idCell.appendChild(code);
      const st = cell(tr, "", "");
      const badge = document.createElement("span");
      badge.className = "state state-" + (k.execution_state || "unknown");
      badge.textContent = k.execution_state || "unknown";
      st.appendChild(badge);
      cell(tr, k.template || k.name || "-", "template");
      cell(tr, duration(k.vm_age), "age");
      cell(tr, ago(k.last_activity, data.time), "activity");
      cell(tr, k.memory ? mb(k.memory.pss) + " / " + mb(k.memory.private) : "-", "memory");
      cell(tr, String(k.connections), "connections");
      const actions = cell(tr, "", "actions");
      actions.appendChild(button("Fork", "fork", () => act(k.id, "fork")));
      const del = confirming === k.id
        ? button("Confirm delete", "danger confirm delete", () => act(k.id, "delete"))
        : button("Delete", "danger delete", () => askDelete(k.id));
      actions.appendChild(del);
      tbody.appendChild(tr);
    }
  }

  function askDelete(id) {
    confirming = id;
    clearTimeout(confirmTimer);
    confirmTimer = setTimeout(() => { confirming = null; if (last) render(last); }, 5000);
    if (last) render(last);
  }

  async function refresh() {
    try {
      const r = await fetch("dashboard/api/kernels", {credentials: "same-origin", cache: "no-store"});
      if (r.status === 401) {
        say("Signed out: open this page again with ?token=YOUR_TOKEN", true);
        return;
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
      if (status.className === "error" && status.dataset.sticky !== "1") say("");
      status.dataset.updated = String(Date.now());
    } catch (e) {
      say("Cannot reach the gateway: " + e.message, true);
    }
  }

  async function act(id, action) {
    confirming = null;
    say((action === "fork" ? "Forking " : "Deleting ") + id.slice(0, 8) + "\u2026");
    try {
      const r = await fetch("dashboard/api/kernels/" + encodeURIComponent(id) + "/" + action, {
        method: "POST", credentials: "same-origin", headers: {"X-VMKG-CSRF": csrf},
      });
      if (!r.ok) {
        let msg = "HTTP " + r.status;
        try { msg = (await r.json()).message || msg; } catch (e) { /* not JSON */ }
        say(action + " refused: " + msg, true);
      } else if (action === "fork") {
        const body = await r.json();
        say("Forked " + id.slice(0, 8) + " into " + body.kernels.join(", "));
      } else {
        say("Deleted " + id.slice(0, 8));
      }
    } catch (e) {
      say(action + " failed: " + e.message, true);
    }
    await refresh();
  }

  refresh();
  setInterval(refresh, POLL_MS);
})();
