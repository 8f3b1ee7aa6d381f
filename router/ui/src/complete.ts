// The completion view: raw /generate with details, each token shaded by its probability, and
// its logprob and the top-n alternatives on hover or tap.
import { call, showError } from "./api";

interface Token {
  id: number;
  text: string;
  logprob: number | null;
  special: boolean;
}

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

function detail(token: Token, top: Token[]) {
  const box = $("token-detail");
  const table = document.createElement("table");
  const head = table.insertRow();
  head.innerHTML = "<th>token</th><th>logprob</th><th>probability</th>";
  for (const t of top.length ? top : [token]) {
    const row = table.insertRow();
    row.classList.toggle("chosen", t.id === token.id);
    for (const v of [JSON.stringify(t.text), t.logprob?.toFixed(3) ?? "–", t.logprob == null ? "–" : `${(Math.exp(t.logprob) * 100).toFixed(1)}%`]) {
      row.insertCell().textContent = v;
    }
  }
  box.replaceChildren(table);
}

async function run() {
  const button = $("run-completion") as HTMLButtonElement;
  button.disabled = true;
  try {
    const temperature = Number(($("completion-temperature") as HTMLInputElement).value);
    const r = await call("POST", "/generate", {
      inputs: ($("completion-prompt") as HTMLTextAreaElement).value,
      parameters: {
        max_new_tokens: Number(($("completion-max") as HTMLInputElement).value),
        details: true,
        top_n_tokens: 5,
        ...(temperature > 0 ? { do_sample: true, temperature } : {}),
      },
    });
    const out = await r.json();
    const tokens: Token[] = out.details.tokens;
    const tops: Token[][] = out.details.top_tokens ?? [];
    const map = $("heatmap");
    map.replaceChildren(
      ...tokens.map((t, i) => {
        const span = document.createElement("span");
        span.className = "token";
        span.textContent = t.text;
        const p = t.logprob == null ? 1 : Math.exp(t.logprob);
        // Likely tokens stay light; unlikely ones turn deep red.
        span.style.backgroundColor = `rgba(220, 38, 38, ${(0.05 + 0.75 * (1 - p)).toFixed(3)})`;
        span.title = `logprob ${t.logprob?.toFixed(3)} (p = ${(p * 100).toFixed(1)}%)`;
        span.dataset.logprob = String(t.logprob);
        const show = () => detail(t, tops[i] ?? []);
        span.addEventListener("mouseenter", show);
        span.addEventListener("click", show);
        return span;
      }),
    );
    $("token-detail").replaceChildren();
  } catch (e) {
    showError(e);
  } finally {
    button.disabled = false;
  }
}

export function initComplete() {
  $("run-completion").addEventListener("click", () => void run());
}
