// Tabs, and the model name from /info.
import "./style.css";
import { call, showError } from "./api";
import { initChat } from "./chat";
import { initComplete } from "./complete";
import { initDashboard, setDashboardVisible } from "./dashboard";

function show(tab: string) {
  for (const section of document.querySelectorAll<HTMLElement>("section.tab")) {
    section.hidden = section.id !== tab;
  }
  for (const button of document.querySelectorAll<HTMLButtonElement>("nav button")) {
    button.classList.toggle("active", button.dataset.tab === tab);
  }
  setDashboardVisible(tab === "dashboard");
  location.hash = tab;
}

for (const button of document.querySelectorAll<HTMLButtonElement>("nav button")) {
  button.addEventListener("click", () => show(button.dataset.tab!));
}

initChat();
initComplete();
initDashboard();
show(["chat", "complete", "dashboard"].includes(location.hash.slice(1)) ? location.hash.slice(1) : "chat");

call("GET", "/info")
  .then((r) => r.json())
  .then((info) => {
    document.getElementById("model")!.textContent = `${info.model_id} · ${info.dtype} · ${info.device_type ?? ""}`;
  })
  .catch(showError);
