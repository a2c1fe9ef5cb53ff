// /duplex.js against a server whose application backend decides (the hooks): the page's cookie
// reaches the `connect` hook through the WebSocket upgrade, and `rpc()` calls the backend.
//
// Run by crates/duplex-server/tests/browser.rs, which starts the backend and the server.

import { check, checkNoProblems, done, launch, watch } from "./harness.mjs";

const PAGE = process.env.DUPLEX_URL;

const browser = await launch();
try {
  const page = watch(await browser.newPage(), "page");
  // A bare script URL as the page: the browser's own favicon request would 404.
  await page.route("**/favicon.ico", (route) => route.fulfill({ status: 204 }));
  await page.goto(`${PAGE}/duplex.js`);
  const result = await page.evaluate(async () => {
    const D = await import("/duplex.js");
    document.cookie = "session=good; path=/";
    const duplex = new D.Duplex();
    const sum = await duplex.rpc("add", { a: 20, b: 22 });
    let failed = null;
    try {
      await duplex.rpc("fail", {});
    } catch (error) {
      failed = error instanceof D.DuplexError ? `${error.code}: ${error.message}` : String(error);
    }
    const present = [];
    await duplex.subscribe("chat:hooks", () => {});
    for (const entry of await duplex.presence("chat:hooks")) present.push(entry.user);
    duplex.close();
    return { sum, failed, present };
  });
  check(result.sum?.sum === 42, `rpc result: ${JSON.stringify(result)}`);
  check(result.failed === "no_such_item: nothing there", `rpc error: ${result.failed}`);
  check(JSON.stringify(result.present) === '["page"]', `the backend named the user: ${JSON.stringify(result)}`);
  console.error("ok: rpc and the connect hook");
  checkNoProblems();
  console.log("PASS");
} finally {
  await browser.close();
  done();
}
