// Open a pathflow run's report in headless Chromium as a person would: the index, its filter and
// sorting, then a feature's page through its link. Saves screenshots and prints JSON of what was seen.
//   node report_pages.mjs REPORT_HTML OUT_DIR [index-only]
import { launch, watchedPage } from "./browser.mjs";

const [report, outDir, mode] = process.argv.slice(2);
const browser = await launch();
const seen = { errors: [], requests: [] };
const page = await watchedPage(browser, seen);
const texts = (sel) => page.$$eval(sel, (els) => els.map((e) => e.textContent.trim()));
try {
  const t0 = Date.now();
  await page.goto(`file://${report}`, { waitUntil: "load" });
  seen.index_load_ms = Date.now() - t0;
  await page.screenshot({ path: `${outDir}/index.png`, fullPage: true });
  seen.features = await texts("#features tbody tr td:first-child");
  if (mode === "index-only") {  // the index at study size: loaded, complete, and sortable
    const t1 = Date.now();
    await page.locator("#features thead th", { hasText: /^layer$/ }).click();
    seen.sort_ms = Date.now() - t1;
    seen.layers_desc = (await texts("#features tbody tr td:nth-child(2)")).map(Number);
    await page.fill("#filter", "risky");
    seen.shown = await page.textContent("#shown");
  } else {
    await featurePages();
  }
} catch (e) {
  seen.error = String(e);
  await page.screenshot({ path: `${outDir}/error.png`, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));

async function featurePages() {
  // sort by layer: descending first, then ascending
  const layerHeader = page.locator("#features thead th", { hasText: /^layer$/ });
  await layerHeader.click();
  seen.layers_desc = (await texts("#features tbody tr td:nth-child(2)")).map(Number);
  await layerHeader.click();
  seen.layers_asc = (await texts("#features tbody tr td:nth-child(2)")).map(Number);
  // filter by text, then by direction
  const first = seen.features[0];
  await page.fill("#filter", first);
  seen.filtered = await page.$$eval("#features tbody tr", (rows) =>
    rows.filter((r) => r.style.display !== "none").map((r) => r.cells[0].textContent.trim()));
  seen.shown = await page.textContent("#shown");
  await page.fill("#filter", "");
  await page.selectOption("#direction", "risky");
  seen.risky = await page.$$eval("#features tbody tr", (rows) =>
    rows.filter((r) => r.style.display !== "none").map((r) => r.cells[2].textContent.trim()));
  await page.selectOption("#direction", "");
  seen.scatter_ticks = await texts("svg.scatter text.tick");
  seen.scatter_titles = await page.$$eval("svg.scatter circle.point title", (ts) => ts.map((t) => t.textContent));
  // a feature's page, through its link
  await page.click(`#features a:text-is("${first}")`);
  await page.waitForLoadState("load");
  seen.feature_url = page.url();
  seen.feature_h1 = await page.textContent("h1");
  await page.screenshot({ path: `${outDir}/feature.png`, fullPage: true });
  seen.pathways = await page.$$eval("svg.pathway", (s) => s.map((e) => e.dataset.feature));
  seen.legend = await texts(".legend");
  seen.edge_colours = await page.$$eval("svg.pathway path", (ps) => ps.map((p) => [p.getAttribute("stroke"),
    p.querySelector("title").textContent]));
  // the whole-prompt graphs: positions across, layers up, edges coloured by their sign
  seen.graphs = await page.$$eval("svg.graph", (gs) => gs.map((g) => ({
    slug: g.dataset.slug,
    edges: [...g.querySelectorAll("line.edge")].map((e) => [e.getAttribute("stroke"), e.querySelector("title").textContent]),
    tokens: [...g.querySelectorAll("text.token")].map((t) => t.textContent),
    rows: [...g.querySelectorAll("text.axis:not(.token)")].map((t) => t.textContent),
    kinds: [...g.querySelectorAll(".gnode")].map((n) => n.getAttribute("class").split(" ")[1]),
  })));
  seen.token_backgrounds = await page.$$eval("table.reads .ctx span", (ss) => ss.map((s) => [s.textContent,
    getComputedStyle(s).backgroundColor, s.title]));
  seen.histogram_bars = await page.$$eval("svg.histogram rect.bar title", (ts) => ts.map((t) => t.textContent));
  seen.histogram_ticks = await texts("svg.histogram text.tick");
  seen.chips = await texts(".tok");
  seen.contrast_headers = await texts(".contrast h3, .contrast th");
  seen.neuronpedia = await page.$$eval("a.neuronpedia", (as) => as.map((a) => a.href));
  seen.body = await page.locator("body").innerText();
  // the only-validated switch hides unvalidated edges
  await page.check("#only-validated");
  seen.hidden_after_switch = await page.$$eval("svg.pathway path.unvalidated", (ps) =>
    ps.filter((p) => getComputedStyle(p).display === "none").length);
  await page.click("a:text('all features of run')");
  await page.waitForLoadState("load");
  seen.back_to = page.url();
}
