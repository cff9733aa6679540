// What the Chromium drivers share: Debian's Chromium, headless, with nothing that phones home; and a page
// whose errors, console messages and requests beyond file:// are collected in ``seen``.
import { chromium } from "playwright-core";

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
}

export async function watchedPage(browser, seen, viewport = { width: 1280, height: 1000 }) {
  const page = await browser.newPage({ viewport });
  page.on("pageerror", (e) => seen.errors.push(String(e)));
  page.on("console", (m) => seen.errors.push(`console ${m.type()}: ${m.text()}`));
  page.on("request", (r) => { if (!r.url().startsWith("file://")) seen.requests.push(r.url()); });
  return page;
}
