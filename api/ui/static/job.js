// A job's page follows the job's Server-Sent Events (the API's stream): state, phase, progress and bytes
// change in place; at the final event the section is fetched again whole (result, error, follow-up forms).
(function () {
  const section = document.getElementById("job");
  if (!section || section.dataset.final === "yes") return;
  const mib = (bytes) => `${Math.round(bytes / 1048576).toLocaleString("en-US")} MB`;
  const show = (id, text) => { document.getElementById(id).textContent = text; };
  const events = new EventSource(section.dataset.events);
  events.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.state) {
      show("job-state", event.state);
      document.getElementById("job-state").className = `state state-${event.state}`;
    }
    if (event.phase !== undefined && event.phase !== null) show("job-phase", event.phase);
    if (event.progress !== undefined && event.progress !== null) {
      document.getElementById("job-progress").value = event.progress;
      show("job-percent", `${Math.round(event.progress)} %`);
    }
    if (event.bytes_total) {
      const rate = event.rate_bps ? `, ${mib(event.rate_bps)}/s` : "";
      show("job-bytes", `${mib(event.bytes_done || 0)} of ${mib(event.bytes_total)}${rate}`);
    }
    if (["succeeded", "failed", "cancelled"].includes(event.state)) {
      events.close();
      htmx.ajax("GET", section.dataset.fragment, { target: "#job", swap: "outerHTML" });
    }
  };
})();
