// Opens a hosted checkout page in Debian's headless Chromium, clicks one button and
// prints where the browser ended up, as one JSON line on stdout:
//
//   node checkout.mjs <checkout-url> <pay|decline|cancel> [--wait-for-url-prefix P]
//   {"final_url": "...", "status": 200, "title": "...", "text": "...", "visited": [...]}
//
// Driven by e2e/test_browser_checkout.py. Playwright here is only the driver
// (playwright-core, no bundled browser): the browser is /usr/bin/chromium from the
// `chromium` Debian package (override with PAYMENTS_CHROMIUM), installed by
// `make browser-deps`. Any failure prints a message on stderr and exits non-zero.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BUTTONS = { pay: "Pay", decline: "Decline", cancel: "Cancel" };
// What this machine's Chromium needs: no sandbox as root, no GPU, and no background
// traffic to Google's hosts (the network is closed; those connections only fail).
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
const TIMEOUT_MS = Number(process.env.CHECKOUT_TIMEOUT_MS || 30000);

function usage(message) {
  process.stderr.write(
    `${message}\nusage: node checkout.mjs <checkout-url> <pay|decline|cancel> ` +
      "[--wait-for-url-prefix PREFIX]\n",
  );
  process.exit(2);
}

async function main() {
  const [url, button, ...rest] = process.argv.slice(2);
  if (!url || !(button in BUTTONS)) usage("a checkout URL and a button are needed");
  let waitPrefix = null;
  if (rest.length) {
    if (rest[0] !== "--wait-for-url-prefix" || rest.length !== 2) usage(`unknown: ${rest}`);
    waitPrefix = rest[1];
  }

  // A fresh, empty profile each run (Playwright passes it as --user-data-dir).
  const profile = mkdtempSync(join(tmpdir(), "payments-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.PAYMENTS_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: TIMEOUT_MS,
  });
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(TIMEOUT_MS);
    const visited = [];
    let lastStatus = null;
    page.on("response", (response) => {
      if (response.request().isNavigationRequest() && response.frame() === page.mainFrame()) {
        visited.push({ url: response.url(), status: response.status() });
        lastStatus = response.status();
      }
    });

    const opened = await page.goto(url, { waitUntil: "load" });
    if (!opened || !opened.ok()) {
      throw new Error(`GET ${url} answered ${opened ? opened.status() : "nothing"}`);
    }
    const checkoutUrl = page.url();
    const target = page.getByRole("button", { name: BUTTONS[button], exact: true });
    // The click submits a form: the page POSTs, gets a 303 and loads the next URL.
    await Promise.all([
      page.waitForURL((next) => next.href !== checkoutUrl, { waitUntil: "load" }),
      target.click(),
    ]);
    if (waitPrefix !== null) {
      await page.waitForURL((next) => next.href.startsWith(waitPrefix), { waitUntil: "load" });
    }
    const result = {
      final_url: page.url(),
      status: lastStatus,
      title: await page.title(),
      text: (await page.locator("body").innerText()).slice(0, 2000),
      checkout_url: checkoutUrl,
      visited,
    };
    process.stdout.write(JSON.stringify(result) + "\n");
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((error) => {
  process.stderr.write(`checkout.mjs: ${error && error.stack ? error.stack : error}\n`);
  process.exit(1);
});
