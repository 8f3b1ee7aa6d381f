// Calls to the server: the API key (asked once, kept in localStorage), clear messages for the
// failures a user can act on (server down, overloaded, bad input), and SSE parsing.

const KEY = "tessera.apiKey";

export class ApiError extends Error {}

function banner(message: string | null) {
  const el = document.getElementById("banner")!;
  el.textContent = message ?? "";
  el.hidden = !message;
}

export function showError(e: unknown) {
  if (e instanceof DOMException && e.name === "AbortError") return;
  banner(e instanceof Error ? e.message : String(e));
}

export function clearError() {
  banner(null);
}

async function askForKey(): Promise<string> {
  const dialog = document.getElementById("key-dialog") as HTMLDialogElement;
  const input = document.getElementById("key-input") as HTMLInputElement;
  input.value = "";
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  localStorage.setItem(KEY, input.value);
  return input.value;
}

async function send(method: string, path: string, body: unknown, signal?: AbortSignal): Promise<Response> {
  const headers: Record<string, string> = { "content-type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) headers.authorization = `Bearer ${key}`;
  try {
    return await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    if (e instanceof DOMException && e.name === "AbortError") throw e;
    throw new ApiError("Cannot reach the server: it may be down or restarting. Try again in a moment.");
  }
}

/** A request that succeeded (2xx), after asking for the API key if the server wants one. */
export async function call(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<Response> {
  let r = await send(method, path, body, signal);
  if (r.status === 401) {
    await askForKey();
    r = await send(method, path, body, signal);
    if (r.status === 401) throw new ApiError("The API key was refused.");
  }
  if (r.status === 429) {
    throw new ApiError("The server is overloaded (429: too many concurrent requests). Try again in a moment.");
  }
  if (!r.ok) {
    let detail = `${r.status} ${r.statusText}`;
    try {
      detail = (await r.json()).error ?? detail;
    } catch {
      /* not JSON */
    }
    throw new ApiError(r.status >= 500 ? `The server failed: ${detail}` : detail);
  }
  clearError();
  return r;
}

/** The `data:` payloads of a server-sent event stream, as they arrive. */
export async function* events(r: Response): AsyncGenerator<string> {
  const reader = r.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart())
        .join("\n");
      if (data) yield data;
    }
  }
}
