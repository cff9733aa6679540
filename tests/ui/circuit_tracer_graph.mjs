// Open one of a run's attribution graphs in circuit-tracer's own frontend (served by its
// local_server) in headless Chromium. The page loads its libraries from sites unreachable here:
// d3 and jetpack are answered with npm's d3@7 + d3-jetpack, dagre and pako with their npm builds;
// every other outside request (feature examples) is refused and listed. With OFFLINE "offline", nothing is
// stood in: every request outside BASE is refused and listed (`pathflow graphs` serves everything itself).
// Prints JSON of what was seen, the feature panel's titles, logits and examples included.
// jetpack's CommonJS build is run with d3 (and d3-collection's nest, which d3 v7 dropped) as every module it
// requires, so it extends the page's d3.
//   node circuit_tracer_graph.mjs BASE_URL SLUG CLICKED_NODE_ID SCREENSHOT [OFFLINE]
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const [base, slug, clicked, shot, offline] = process.argv.slice(2);
const mods = join(dirname(fileURLToPath(import.meta.url)), "node_modules");
const js = (path) => ({ status: 200, contentType: "application/javascript", body: readFileSync(join(mods, path)) });
const jetpack = () => ({ status: 200, contentType: "application/javascript", body:
  readFileSync(join(mods, "d3-collection/dist/d3-collection.js"), "utf8") +  // d3.nest, gone from d3 v7
  "\n(function () { var module = {exports: {}}, exports = module.exports, require = function () { return window.d3 };\n" +
  readFileSync(join(mods, "d3-jetpack/build/d3-jetpack.cjs"), "utf8") +
  "\nfor (var k in module.exports) if (!(k in window.d3)) window.d3[k] = module.exports[k];" +
  // the page's jetpack build (2024) gives conventions() a drawAxis(svg) method; npm's has d3.drawAxis(c)
  "\nvar conventions = window.d3.conventions; window.d3.conventions = function (c) { c = conventions(c);" +
  " c.drawAxis = function (svg) { var own = c.svg; if (svg) c.svg = svg; var r = window.d3.drawAxis(c);" +
  " c.svg = own; return r }; return c } })()" });
const stand_ins = [
  [/static_js\/lib\/d3\.js$/, () => js("d3/dist/d3.js")],
  [/static_js\/lib\/jetpack_[\d-]+\.js$/, jetpack],
  [/hotserver-client-ws\.js$/, () => ({ status: 200, contentType: "application/javascript", body: "" })],
  [/npy_v0\.js$/, () => ({ status: 200, contentType: "application/javascript",
                           body: "window.npyjs = {parse() { throw new Error('npy: offline') }}" })],
  [/unpkg\.com\/dagre@[\d.]+\/dist\/dagre\.min\.js$/, () => js("dagre/dist/dagre.min.js")],
  [/unpkg\.com\/pako@[\d.]+\/dist\/pako\.min\.js$/, () => js("pako/dist/pako.min.js")],
];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const seen = { page_errors: [], console_errors: [], refused: [] };
const page = await browser.newPage({ viewport: { width: 1600, height: 1100 } });
page.on("pageerror", (e) => seen.page_errors.push(String(e)));
page.on("console", (m) => { if (m.type() === "error") seen.console_errors.push(m.text()); });
await page.route("**/*", async (route) => {
  const url = route.request().url();
  if (url.startsWith(base)) return route.continue();
  if (offline !== "offline") for (const [pattern, answer] of stand_ins) if (pattern.test(url)) return route.fulfill(answer());
  seen.refused.push(url);
  return route.abort();
});
const texts = (sel) => page.$$eval(sel, (els) => els.map((e) => e.textContent.trim()));
try {
  await page.goto(`${base}/index.html?slug=${encodeURIComponent(slug)}&clickedId=${encodeURIComponent(clicked)}`,
                  { waitUntil: "load" });
  await page.waitForSelector("g.prompt-token text", { timeout: 30000 });
  await page.waitForFunction(() => [...document.querySelectorAll(".feature-title")]
    .some((e) => e.textContent.includes("Feature")), null, { timeout: 30000 });
  await page.waitForTimeout(500);
  seen.tokens = await texts("g.prompt-token text");
  seen.feature_title = (await texts(".feature-title")).filter((t) => t.includes("Feature"));
  seen.selected = await page.$eval("select.graph-prompt-select", (s) => s.options[s.selectedIndex].textContent);
  // the clicked node's connections: each row's label, its weight as the page prints it, its colour
  seen.connections = await page.$$eval(".feature-row", (rows) => rows
    .filter((r) => r.querySelector(".weight") && r.querySelector(".weight").textContent.trim())
    .map((r) => ({ label: r.querySelector(".label")?.textContent.trim(),
                   weight: r.querySelector(".weight").textContent.trim(),
                   background: getComputedStyle(r).backgroundColor })));
  seen.n_nodes = await page.$$eval("circle, rect.node", (e) => e.length);
  // the feature panel: the clicked node's file (top logits, example contexts), once loaded
  await page.waitForFunction(() => document.querySelector(".feature-example-list .ctx-container"), null,
                             { timeout: 10000 }).catch(() => {});
  seen.logits = await texts(".feature-example-logits .ctx-container");
  seen.quantiles = await texts(".feature-example-list .quantile-title");
  seen.examples = await texts(".feature-example-list .ctx-container");
  await page.screenshot({ path: shot, fullPage: true });
} catch (e) {
  seen.error = String(e);
  await page.screenshot({ path: shot, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
