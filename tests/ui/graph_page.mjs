// Work the whole-prompt graph on a feature page in headless Chromium at 1,400 px, as a person would: is it
// all in view (no sideways scroll, the target and the decision on screen, the layer labels there); the
// pruning control; hover a node for its label; click one for its numbers and links, follow a link, clear.
// Saves screenshots, prints JSON.   node graph_page.mjs FEATURE_HTML OUT_DIR
import { launch, watchedPage } from "./browser.mjs";

const [file, outDir] = process.argv.slice(2);
const browser = await launch();
const seen = { errors: [], requests: [] };
const page = await watchedPage(browser, seen, { width: 1400, height: 1000 });
const box = ".graph-box";
const shownEdges = () => page.$$eval(`${box} >> nth=0`, () => 0).then(() => page.$eval(box, (b) =>
  [...b.querySelectorAll("line.edge")].filter((e) => e.style.display !== "none").length));
try {
  await page.goto(`file://${file}`, { waitUntil: "load" });
  const g = await page.$(`${box} svg.graph`);
  await g.scrollIntoViewIfNeeded();
  await page.screenshot({ path: `${outDir}/graph.png` });
  seen.page = await page.evaluate(() => ({ scroll_width: document.documentElement.scrollWidth, inner: innerWidth }));
  seen.svg = await g.boundingBox();
  seen.outputs = await page.$$eval(`${box} text.output-label`, (ts) => ts.map((t) => {
    const r = t.getBoundingClientRect(); return { label: t.textContent, left: r.left, right: r.right }; }));
  seen.layers = await page.$$eval(`${box} text.layer`, (ts) => ts.map((t) => {
    const r = t.getBoundingClientRect(); return { label: t.textContent, left: r.left }; }));
  seen.n_drawn = await page.$$eval(`${box} line.edge`, (es) => es.length);
  seen.shown_at_load = await shownEdges();
  seen.slider = await page.$eval(`${box} input.prune`, (s) => ({ min: +s.min, max: +s.max, value: +s.value }));
  // pruning: the fewest links, then every one
  await page.$eval(`${box} input.prune`, (s) => { s.value = s.min; s.dispatchEvent(new Event("input")); });
  seen.shown_at_min = await shownEdges();
  seen.output_at_min = await page.textContent(`${box} .n-shown`);
  seen.nodes_at_min = await page.$eval(box, (b) => [...b.querySelectorAll(".gnode")].filter((n) => n.style.display !== "none")
    .map((n) => n.dataset.id));
  seen.ends_at_min = await page.$eval(box, (b) => [...new Set([...b.querySelectorAll("line.edge")]
    .filter((e) => e.style.display !== "none").flatMap((e) => [e.dataset.s, e.dataset.t]))]);
  await page.$eval(`${box} input.prune`, (s) => { s.value = s.max; s.dispatchEvent(new Event("input")); });
  seen.shown_at_max = await shownEdges();
  // hover an upstream feature: its label
  const feat = await page.$(`${box} circle.gnode.feature`);
  const fid = await feat.getAttribute("data-id");
  await feat.hover();
  seen.hover = { id: fid, label: await feat.getAttribute("data-label"), tip: await page.textContent(`${box} .graph-tip`),
                 tip_hidden: await page.$eval(`${box} .graph-tip`, (t) => t.hidden) };
  // click it: the panel, its links lit
  await feat.click();
  seen.click = {
    id: fid,
    panel_hidden: await page.$eval(`${box} .node-panel`, (p) => p.hidden),
    title: await page.textContent(`${box} .node-panel h4`),
    numbers: await page.$$eval(`${box} .node-panel dt`, (ds) => ds.map((d) => d.textContent)),
    links: await page.$$eval(`${box} .node-panel ul.links a`, (as) => as.map((a) => a.dataset.id)),
    lit: await page.$eval(box, (b) => [...b.querySelectorAll("line.edge.on")].map((e) => [e.dataset.s, e.dataset.t])),
  };
  await page.screenshot({ path: `${outDir}/graph-clicked.png` });
  if (seen.click.links.length) {  // follow the first link in the panel
    await page.click(`${box} .node-panel ul.links a >> nth=0`);
    seen.followed = await page.textContent(`${box} .node-panel h4`);
  }
  await page.click(`${box} svg.graph rect.bg`, { position: { x: 5, y: 5 } });
  seen.cleared = await page.$eval(`${box} .node-panel`, (p) => p.hidden);
  seen.chains = await page.$$eval("ol.chains li", (ls) => ls.map((l) => l.textContent.replace(/\s+/g, " ").trim()));
  seen.decision = await page.$$eval("table.decision tr", (rs) => rs.map((r) => [...r.cells].map((c) => c.textContent.trim())));
  seen.decision_words = await page.textContent(".decision-words");
} catch (e) {
  seen.error = String(e);
  await page.screenshot({ path: `${outDir}/graph-error.png`, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
