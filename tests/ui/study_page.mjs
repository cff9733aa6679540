// Work a run's study page ("What drives the risky features") in headless Chromium as a person would:
// switch the target direction, click a span of the prompt text and see it picked in the tables, read the
// heat map's cells (their titles), then follow a feature's link to its contrast section. Saves screenshots, prints JSON.
//   node study_page.mjs STUDY_HTML OUT_DIR
import { launch, watchedPage } from "./browser.mjs";

const [study, outDir] = process.argv.slice(2);
const browser = await launch();
const seen = { errors: [], requests: [] };
const page = await watchedPage(browser, seen);
const visible = (sel) => page.$$eval(sel, (els) => els.filter((e) => e.offsetParent !== null).map((e) => e.textContent.trim()));
try {
  await page.goto(`file://${study}`, { waitUntil: "load" });
  seen.h1 = await page.textContent("h1");
  await page.screenshot({ path: `${outDir}/study.png`, fullPage: true });
  seen.tabs = await page.$$eval(".tabs button", (bs) => bs.map((b) => b.dataset.direction));
  seen.sections = {};
  for (const d of seen.tabs) {  // each direction in turn: only its section shows
    await page.click(`.tabs button[data-direction="${d}"]`);
    const shown = await page.$$eval("section.direction", (ss) => ss.filter((s) => !s.hidden).map((s) => s.dataset.direction));
    const sec = `section.direction[data-direction="${d}"]`;
    seen.sections[d] = {
      shown,
      pressed: await page.getAttribute(`.tabs button[data-direction="${d}"]`, "aria-pressed"),
      spans_text: (await page.$$eval(`${sec} .prompt-col`, (cs) => cs.map((c) => [c.dataset.prompt,
        [...c.querySelectorAll(".span")].map((s) => s.textContent).join("")]))),
      coloured: await page.$$eval(`${sec} .spans .span`, (ss) => ss.filter((s) => getComputedStyle(s).backgroundColor !== "rgba(0, 0, 0, 0)").length),
      cells: await page.$$eval(`${sec} svg.heatmap rect.cell`, (rs) => rs.length),
      cell_titles: await page.$$eval(`${sec} svg.heatmap rect.cell title`, (ts) => ts.slice(0, 3).map((t) => t.textContent)),
      span_rows: await visible(`${sec} table.spans-table tr[data-span] td:first-child`),
      feeds: await visible(`${sec} table.feeds tr td:first-child`),
    };
    // click the span the table ranks first: it and its rows are picked
    const first = await page.getAttribute(`${sec} table.spans-table tr[data-span]`, "data-span");
    await page.click(`${sec} .prompt-col:first-child .span[data-span="${first}"]`);
    seen.sections[d].picked = await page.$$eval(`${sec} .picked`, (ps) => ps.map((p) => [p.tagName, p.dataset.span]));
    seen.sections[d].first_span = first;
    await page.screenshot({ path: `${outDir}/study-${d}.png`, fullPage: true });
  }
  // a feature's page through the study page's link, at its contrast section
  const link = page.locator("section.direction:not([hidden]) table.feeds a").first();
  if (await link.count()) {
    await link.click();
    await page.waitForLoadState("load");
    seen.feature_url = page.url();
    seen.contrast_h2 = await page.textContent("h2#contrast");
    seen.feature_spans = await page.$$eval(".prompt-col", (cs) => cs.map((c) => c.dataset.prompt));
    seen.patch_tables = await page.$$eval("table.patch", (ts) => ts.map((t) => t.dataset.patch));
    await page.locator("h2#contrast").scrollIntoViewIfNeeded();
    await page.screenshot({ path: `${outDir}/feature-contrast.png`, fullPage: true });
  }
} catch (e) {
  seen.error = String(e);
  await page.screenshot({ path: `${outDir}/error.png`, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
