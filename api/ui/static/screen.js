// The VM's graphical console: noVNC's RFB client on the relayed websocket, with the VM's VNC password.
const { default: RFB } = await import(document.querySelector("script[data-rfb]").dataset.rfb);
const element = document.getElementById("screen");
const status = document.getElementById("screen-status");
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const rfb = new RFB(element, `${scheme}//${location.host}${element.dataset.socket}`,
                    { credentials: { password: element.dataset.password } });
rfb.scaleViewport = true;
rfb.addEventListener("connect", () => { status.textContent = "connected"; });
rfb.addEventListener("disconnect", (event) => { status.textContent = event.detail.clean ? "closed" : "lost"; });
rfb.addEventListener("securityfailure", (event) => { status.textContent = `refused: ${event.detail.reason}`; });
