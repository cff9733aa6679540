// Open the Prefect UI page of a flow run in headless Chromium, wait until the run and its artifacts
// are shown, and save screenshots. Prints JSON: the texts found on the run page and the artifacts tab.
//   node flow_run_page.mjs UI_URL FLOW_RUN_ID OUT_DIR FLOW_NAME RUN_NAME ARTIFACT_KEY...
// Each text is waited for: the page fills in its parts (the flow's name, the state) from separate requests.
import { chromium } from "playwright-core";

const [ui, flowRunId, outDir, flowName, runName, ...keys] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const result = { url: `${ui}/runs/flow-run/${flowRunId}` };
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
try {
  await page.goto(result.url, { waitUntil: "domcontentloaded" });
  await page.getByText(runName, { exact: true }).first().waitFor({ timeout: 60000 });
  await page.getByText("Completed").first().waitFor({ timeout: 30000 });
  await page.getByText(flowName).first().waitFor({ timeout: 30000 });
  await page.screenshot({ path: `${outDir}/flow-run.png`, fullPage: true });
  result.run_page = await page.locator("body").innerText();
  await page.getByText("Artifacts", { exact: true }).first().click();
  for (const key of keys) {
    await page.getByText(key).first().waitFor({ timeout: 30000 });
  }
  await page.screenshot({ path: `${outDir}/artifacts.png`, fullPage: true });
  result.artifacts_tab = await page.locator("body").innerText();
} catch (e) {
  result.error = String(e);
  await page.screenshot({ path: `${outDir}/error.png`, fullPage: true });
  result.page_text = await page.locator("body").innerText();
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
