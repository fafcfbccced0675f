// hookline's dashboard: the two live parts, in plain JavaScript.
"use strict";

// A running job's events and output, as they come (the page renders what came before).
function followJob(table) {
  const body = table.tBodies[0];
  const output = document.getElementById("live-output");
  const status = document.getElementById("job-status");
  const source = new EventSource(table.dataset.live);
  const types = ["job.queued", "job.started", "job.output.delta", "job.progress", "job.log",
                 "job.succeeded", "job.failed", "job.cancelled", "job.expired"];
  const terminal = new Set(["job.succeeded", "job.failed", "job.cancelled", "job.expired"]);
  const onEvent = (message) => {
    const event = JSON.parse(message.data);
    const type = message.type;
    if (type === "job.output.delta" && output) {
      output.textContent += event.data ? event.data.text || "" : event.text || "";
    }
    if (event.seq === null || event.seq === undefined) return; // live text: output only
    const row = body.insertRow();
    row.className = "arrived";
    const cells = [String(event.seq), type, (event.created_at || "").replace("T", " ").replace("Z", " UTC"),
                   type === "job.output.delta" ? (event.data || {}).text || "" : JSON.stringify(event.data || {})];
    cells.forEach((text, i) => {
      const cell = row.insertCell();
      if (i === 1) { const span = document.createElement("span"); span.className = "event"; span.textContent = text; cell.append(span); }
      else { cell.textContent = text; if (i === 3) cell.className = "data"; }
    });
    if (type === "job.started" && status) { status.textContent = "running"; status.className = "status running"; }
    if (terminal.has(type)) {
      source.close();
      if (status) { status.textContent = type.slice(4); status.className = "status " + type.slice(4); }
      setTimeout(() => window.location.reload(), 1500);
    }
  };
  types.forEach((type) => source.addEventListener(type, onEvent));
}

// Tables that refresh themselves (the batches' progress).
function refresh(table) {
  const tick = async () => {
    try {
      const answer = await fetch(table.dataset.refresh, { credentials: "same-origin" });
      if (answer.ok) table.tBodies[0].innerHTML = await answer.text();
    } catch (error) { /* the next tick tries again */ }
  };
  setInterval(tick, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table[data-live]").forEach(followJob);
  document.querySelectorAll("table[data-refresh]").forEach(refresh);
});
