// The live dashboard: polls /ui/stats every second while visible and draws the last two
// minutes with uPlot.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { call, showError } from "./api";

interface Percentiles {
  count: number;
  p50: number | null;
  p90: number | null;
  p99: number | null;
}
interface Stats {
  requests: number;
  successes: number;
  failures: number;
  running: number;
  queued: number;
  kv_total_blocks: number;
  kv_free_blocks: number;
  kv_cached_blocks: number;
  prefix_cache_hit_ratio: number;
  tokens_per_second: number;
  time_to_first_token: Percentiles;
  inter_token_latency: Percentiles;
}

const POINTS = 120;
const $ = (id: string) => document.getElementById(id)!;
const ms = (s: number | null) => (s == null ? null : s * 1000);

let timer: number | undefined;
let charts: uPlot[] = [];
const data: Record<string, (number | null)[]> = {};
const series = ["t", "tps", "running", "queued", "ttft50", "ttft90", "ttft99", "itl50", "itl99", "kvUsed", "kvCached", "hit"];
for (const s of series) data[s] = [];

function chart(id: string, label: string, names: [string, string][]): uPlot {
  const el = $(id);
  const colors = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c"];
  return new uPlot(
    {
      width: Math.max(280, el.clientWidth || 600),
      height: 200,
      scales: { x: { time: true } },
      axes: [{}, { label }],
      series: [{}, ...names.map(([, name], i) => ({ label: name, stroke: colors[i % colors.length], width: 2 }))],
    },
    [data.t, ...names.map(([key]) => data[key])] as uPlot.AlignedData,
    el,
  );
}

function draw() {
  if (!charts.length) {
    charts = [
      chart("chart-load", "tokens/s · requests", [["tps", "tokens/s"], ["running", "running"], ["queued", "queued"]]),
      chart("chart-latency", "ms", [["ttft50", "TTFT p50"], ["ttft90", "TTFT p90"], ["ttft99", "TTFT p99"], ["itl50", "ITL p50"], ["itl99", "ITL p99"]]),
      chart("chart-kv", "blocks · %", [["kvUsed", "blocks used"], ["kvCached", "blocks cached"], ["hit", "prefix hit %"]]),
    ];
  }
  const keys = [["tps", "running", "queued"], ["ttft50", "ttft90", "ttft99", "itl50", "itl99"], ["kvUsed", "kvCached", "hit"]];
  charts.forEach((c, i) => c.setData([data.t, ...keys[i].map((k) => data[k])] as uPlot.AlignedData));
}

function push(s: Stats) {
  const point: Record<string, number | null> = {
    t: Date.now() / 1000,
    tps: s.tokens_per_second,
    running: s.running,
    queued: s.queued,
    ttft50: ms(s.time_to_first_token.p50),
    ttft90: ms(s.time_to_first_token.p90),
    ttft99: ms(s.time_to_first_token.p99),
    itl50: ms(s.inter_token_latency.p50),
    itl99: ms(s.inter_token_latency.p99),
    kvUsed: s.kv_total_blocks - s.kv_free_blocks - s.kv_cached_blocks,
    kvCached: s.kv_cached_blocks,
    hit: s.prefix_cache_hit_ratio * 100,
  };
  for (const k of series) {
    data[k].push(point[k]);
    if (data[k].length > POINTS) data[k].shift();
  }
  const used = s.kv_total_blocks ? (100 * (s.kv_total_blocks - s.kv_free_blocks)) / s.kv_total_blocks : 0;
  $("stat-requests").textContent = String(s.requests);
  $("stat-failures").textContent = String(s.failures);
  $("stat-running").textContent = String(s.running);
  $("stat-queued").textContent = String(s.queued);
  $("stat-kv").textContent = `${used.toFixed(1)}%`;
  $("stat-hits").textContent = `${(s.prefix_cache_hit_ratio * 100).toFixed(1)}%`;
  $("stat-tps").textContent = s.tokens_per_second.toFixed(1);
  const ttft = ms(s.time_to_first_token.p50);
  $("stat-ttft").textContent = ttft == null ? "–" : `${ttft.toFixed(0)} ms`;
}

async function poll() {
  try {
    const r = await call("GET", "/ui/stats");
    push(await r.json());
    draw();
  } catch (e) {
    showError(e);
  }
}

export function setDashboardVisible(visible: boolean) {
  if (visible && timer === undefined) {
    void poll();
    timer = window.setInterval(() => void poll(), 1000);
  } else if (!visible && timer !== undefined) {
    window.clearInterval(timer);
    timer = undefined;
  }
}

export function initDashboard() {
  window.addEventListener("resize", () => {
    for (const c of charts) c.setSize({ width: Math.max(280, c.root.parentElement!.clientWidth), height: 200 });
  });
}
