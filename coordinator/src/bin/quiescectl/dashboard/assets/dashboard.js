// quiescectl dashboard: live updates. Pages are rendered by the server; this only polls the
// dashboard's own JSON endpoints (same origin) and updates running sets as they progress.
"use strict";
(function () {
  const POLL_MS = 500;

  async function getJSON(path) {
    const reply = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!reply.ok) throw new Error(path + ": " + reply.status);
    return reply.json();
  }

  // Replaces the page's <main> with a fresh render of this address, in place (no navigation):
  // the finished set's timeline and verdict appear where the live phases were.
  async function refreshMain() {
    const reply = await fetch(window.location.href, { cache: "no-store" });
    if (!reply.ok) throw new Error(window.location.href + ": " + reply.status);
    const doc = new DOMParser().parseFromString(await reply.text(), "text/html");
    const fresh = doc.querySelector("main");
    const main = document.querySelector("main");
    if (!fresh || !main) throw new Error("no <main> in the page");
    main.replaceWith(document.adoptNode(fresh));
    start();
  }

  // A set page while its set runs: append each phase as it is reached, then show the finished
  // page (timeline, verdict) in place.
  function followSet(list) {
    const id = list.dataset.liveSet;
    const created = Number(list.dataset.createdMs || 0);
    const tick = async function () {
      try {
        const reply = await getJSON("/api/sets/" + encodeURIComponent(id));
        const set = reply.set || {};
        const phases = set.phases || [];
        for (let i = list.children.length; i < phases.length; i++) {
          const li = document.createElement("li");
          li.dataset.phase = phases[i].phase;
          li.textContent = phases[i].phase + " ";
          const at = document.createElement("span");
          at.className = "muted";
          at.textContent = "+" + (phases[i].at_ms - created) + " ms";
          li.appendChild(at);
          list.appendChild(li);
        }
        const state = document.getElementById("set-state");
        if (state && set.state) state.textContent = set.state + " (" + set.phase + ")";
        if (set.state && set.state !== "running") {
          await refreshMain();
          return;
        }
      } catch (e) {
        // The coordinator or the dashboard is restarting: keep trying.
      }
      window.setTimeout(tick, POLL_MS);
    };
    tick();
  }

  // A running set's phase badge (groups page): update it; reload once it ends.
  function followBadge(badge) {
    const id = badge.dataset.liveSet;
    const tick = async function () {
      try {
        const set = (await getJSON("/api/sets/" + encodeURIComponent(id))).set || {};
        badge.textContent = set.phase || "-";
        if (set.state && set.state !== "running") {
          window.location.reload();
          return;
        }
      } catch (e) {}
      window.setTimeout(tick, POLL_MS);
    };
    tick();
  }

  // The groups page: reload when a set starts or ends or a group's health changes.
  function watchGroups(table) {
    const key = function (groups) {
      return groups.map(function (g) {
        return [g.name, g.running_set, g.last_consistent_set, g.overdue].join("|");
      }).join(";");
    };
    const rendered = Array.from(table.querySelectorAll("tr.group")).map(function (row) {
      return [row.dataset.group, row.dataset.running, row.dataset.last, row.dataset.overdue].join("|");
    }).join(";");
    const tick = async function () {
      try {
        const reply = await getJSON("/api/groups");
        if (key(reply.groups || []) !== rendered) {
          window.location.reload();
          return;
        }
      } catch (e) {}
      window.setTimeout(tick, 5000);
    };
    window.setTimeout(tick, 5000);
  }

  function start() {
    document.querySelectorAll("ol[data-live-set]").forEach(followSet);
    document.querySelectorAll("span[data-live-set]").forEach(followBadge);
    const groups = document.getElementById("groups");
    if (groups) watchGroups(groups);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
