// What the browser scripts share: the command line to the Rust harness (see
// crates/duplex-server/tests/web/mod.rs), checks, waiting for the page, and a Chromium whose
// pages fail the run on any page error or console error.

import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const TIMEOUT = 15000;

const input = createInterface({ input: process.stdin });
const answers = input[Symbol.asyncIterator]();

/** Asks the Rust side to do `name` with `arg`; resolves with its JSON answer. */
export async function harness(name, arg = {}) {
  console.log(`CMD ${name} ${JSON.stringify(arg)}`);
  const { value } = await answers.next();
  if (!value || !value.startsWith("OK ")) throw new Error(`the harness answered ${value} to ${name}`);
  return JSON.parse(value.slice(3));
}

export function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

export async function waitFor(page, predicate, arg, what, timeout = TIMEOUT) {
  try {
    await page.waitForFunction(predicate, arg, { timeout, polling: 20 });
  } catch (error) {
    throw new Error(`timed out waiting for ${what}: ${error.message}`);
  }
}

/** Waits until the element of `testid` shows `text` (a string it contains, or a RegExp). */
export async function waitForText(page, testid, text, what) {
  const locator = page.getByTestId(testid);
  const matches = (content) => (text instanceof RegExp ? text.test(content) : content.includes(text));
  const start = Date.now();
  let last = "";
  while (Date.now() - start < TIMEOUT) {
    last = (await locator.allTextContents()).join("\n");
    if (matches(last)) return last;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`timed out waiting for ${what}: ${testid} shows ${JSON.stringify(last.slice(0, 400))}`);
}

/** Chromium, headless, as root on a machine without a network. */
export async function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--autoplay-policy=no-user-gesture-required"],
  });
}

/** Every page error and console error of the pages given to `watch`, to assert none. */
export const problems = [];

/** HTTP statuses a script provokes on purpose (Chromium logs every failed fetch as an error). */
const provoked = new Set();

/** Says that the next steps provoke `status` on purpose (a 412 conflict, a 504 timeout). */
export function provoke(status) {
  provoked.add(status);
}

/** Collects `page`'s errors into `problems`; with `consoleErrors: false` only uncaught
 * exceptions count (for a script that cuts the network under the page on purpose). */
export function watch(page, name = "page", { consoleErrors = true } = {}) {
  page.on("pageerror", (error) => problems.push(`${name}: page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() !== "error") return;
    if (!consoleErrors) {
      console.error(`${name}: ${message.text()}`);
      return;
    }
    const failed = message.text().match(/^Failed to load resource: the server responded with a status of (\d+)/);
    if (failed && provoked.has(Number(failed[1]))) return;
    problems.push(`${name}: console error: ${message.text()}`);
  });
  return page;
}

/** Fails when any watched page had an error. */
export function checkNoProblems() {
  check(problems.length === 0, `no page errors: ${problems.join("; ")}`);
}

/** Saves a screenshot into DUPLEX_SCREENSHOTS (the docs/ folder) when that is set. */
export async function screenshot(page, name) {
  const folder = process.env.DUPLEX_SCREENSHOTS;
  if (!folder) return;
  await page.screenshot({ path: `${folder}/${name}.png` });
  console.error(`screenshot: ${folder}/${name}.png`);
}

export function done() {
  input.close();
}
