// Drives courier's /ui page in headless Chromium (Debian's, at CHROMIUM or /usr/bin/chromium).
// Usage: node ui.mjs BASE_URL TOKEN SCREENSHOT_PATH
// Checks: the counts the test set up are shown; the hostile dead letter is shown as text and
// no dialog fires; a wrong token gets 401; filtering by reason and requeueing that group after
// a confirmation that names the count. Prints one JSON line of what it saw; exits 1 on failure.
import { chromium } from "playwright-core";

const [base, token, screenshot] = process.argv.slice(2);
const fail = (message) => { console.error("UI TEST FAILED: " + message); process.exit(1); };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const seen = { dialogs: 0, violations: [] };
// Polls `check` (run in Node, reading the page through locators: the page's CSP forbids the
// eval that page.waitForFunction needs) until it is true, for up to 10 s.
async function until(what, check) {
  for (let i = 0; i < 200; i++) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  fail("timed out waiting for " + what);
}
try {
  const page = await browser.newPage();
  page.on("dialog", async (dialog) => { seen.dialogs += 1; await dialog.dismiss(); });
  page.on("console", (m) => { if (m.type() === "error") seen.violations.push(m.text()); });
  const response = await page.goto(base + "/ui");
  const csp = response.headers()["content-security-policy"] || "";
  if (!csp.includes("default-src 'self'")) fail("no CSP default-src 'self': " + csp);

  // The depths: dead count of the queue row.
  await page.waitForSelector("#queues tbody tr");
  const dead = await page.textContent("#queues tbody tr td:nth-child(5)");
  seen.dead_shown = dead;

  // A wrong token: 401, nothing listed.
  await page.fill("#token", "wrong-token-0123456789abcdef");
  await page.click("#connect");
  await until("401", async () => (await page.textContent("#auth-status")).includes("401"));
  if ((await page.$$("#letters tbody tr")).length !== 0) fail("letters listed with a wrong token");

  // The right token.
  await page.fill("#token", token);
  await page.click("#connect");
  await until("connected", async () => (await page.textContent("#auth-status")) === "connected");
  await page.waitForSelector("#groups tbody tr");
  await page.waitForSelector("#letters tbody tr");
  seen.groups = await page.$$eval("#groups tbody tr", (rows) => rows.map((r) => r.cells[1].textContent + ":" + r.cells[0].textContent));

  // The hostile letter: its text is there, as text; no element was made from it.
  const hostile = await page.$$eval("#letters tbody tr", (rows) => rows.map((r) => r.cells[5].textContent).find((t) => t.includes("<img")));
  if (!hostile) fail("the hostile error is not shown as text");
  seen.hostile_text = hostile;
  if ((await page.$$("#letters img, #letters script, #groups img, #groups script")).length) fail("markup from a dead letter became elements");
  await page.click("#letters tbody tr:has-text('<img')");
  await until("the letter", async () => (await page.textContent("#letter")).includes("onerror"));
  if ((await page.$$("#letter img, #letter script")).length) fail("the letter view made elements");

  // Filter by reason, requeue that group with the confirmation.
  await page.fill("#f-reason", "rejected");
  await page.click("#apply");
  await until("the filtered list", async () => {
    const reasons = await page.$$eval("#letters tbody tr", (rows) => rows.map((r) => r.cells[2].textContent));
    return reasons.length > 0 && reasons.every((r) => r === "rejected");
  });
  seen.filtered = await page.$$eval("#letters tbody tr", (rows) => rows.map((r) => r.cells[1].textContent));
  await page.click("#requeue-filter");
  await page.waitForSelector("#confirm:not([hidden])");
  seen.confirm = await page.textContent("#confirm-text");
  await page.screenshot({ path: screenshot, fullPage: true });
  await page.click("#confirm-yes");
  await until("the requeue", async () => (await page.textContent("#result")).startsWith("requeued"));
  seen.result = await page.textContent("#result");
  await page.waitForTimeout(300);
  if (seen.dialogs !== 0) fail("a dialog fired");
  console.log(JSON.stringify(seen));
} catch (e) {
  fail(String(e && e.stack || e));
} finally {
  await browser.close();
}
