// Drives `serve`'s live page in headless Chromium through puppeteer-core (the Chrome DevTools
// protocol), as a person would: types the prompt, sets the controls, clicks Generate, waits for
// the page to finish, and prints what the page shows as one JSON line.
// Usage: node drive_page.js URL '{"prompt": ..., "max_tokens": N, "vector": NAME, "scale": S, "ablate": bool, "threed": bool}'
const puppeteer = require("puppeteer-core");

(async () => {
  const [url, actionsJson] = process.argv.slice(2);
  const a = JSON.parse(actionsJson || "{}");
  const browser = await puppeteer.launch({
    executablePath: process.env.GGUF_TRACE_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--no-first-run", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"],
  });
  const errors = [];
  try {
    const page = await browser.newPage();
    page.on("pageerror", (e) => errors.push(String(e)));
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    await page.goto(url, { waitUntil: "load" });
    // The directions list is filled from /v1/models after load.
    if (a.vector) await page.waitForSelector(`#vector option[value="${a.vector}"]`, { timeout: 30000 });
    await page.$eval("#prompt", (el) => { el.value = ""; });
    await page.type("#prompt", a.prompt || "");
    if (a.max_tokens) await page.$eval("#max", (el, v) => { el.value = String(v); }, a.max_tokens);
    if (a.vector) await page.select("#vector", a.vector);
    if (a.scale !== undefined) {
      await page.$eval("#scale", (el, v) => { el.value = String(v); el.dispatchEvent(new Event("input")); }, a.scale);
    }
    if (a.ablate) await page.click("#ablate");
    if (a.threed) await page.click("#threed");
    await page.click("#go");
    await page.waitForFunction(() => document.body.dataset.done === "1", { timeout: 300000 });
    const result = JSON.parse(await page.$eval("#result", (el) => el.textContent));
    result.page_errors = errors;
    result.cells = await page.$$eval(".cell", (c) => c.length);
    result.shown_tokens = await page.$$eval(".tok .text", (t) => t.map((x) => x.textContent));
    result.scale_shown = await page.$eval("#scaleval", (el) => el.textContent);
    result.plot_type = await page.evaluate(() => ((document.getElementById("plot").data || [])[0] || {}).type || null);
    console.log(JSON.stringify(result));
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(String(e)); process.exit(1); });
