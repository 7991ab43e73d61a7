// The VM's serial console: keystrokes from xterm.js go out as bytes, the console's bytes come in.
(function () {
  const element = document.getElementById("terminal");
  const status = document.getElementById("console-status");
  const terminal = new Terminal({ cols: 100, rows: 30, convertEol: false, scrollback: 5000 });
  terminal.open(element);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}${element.dataset.socket}`);
  socket.binaryType = "arraybuffer";
  const encoder = new TextEncoder();
  socket.onopen = () => { status.textContent = "connected"; terminal.focus(); };
  socket.onmessage = (event) => terminal.write(new Uint8Array(event.data));
  socket.onclose = () => { status.textContent = "closed"; };
  terminal.onData((data) => { if (socket.readyState === WebSocket.OPEN) socket.send(encoder.encode(data)); });
})();
