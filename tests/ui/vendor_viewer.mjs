// Rebuild pathflow/viewer_static/vendor/ from this folder's npm packages (package-lock.json pins them):
// the scripts circuit-tracer's page loads from the internet, so that `pathflow graphs` works offline.
//   (cd tests/ui && npm ci && node vendor_viewer.mjs)
// tests/test_viewer.py checks that the vendored files are these packages' files, byte for byte.
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const mods = join(here, "node_modules");
const out = join(here, "..", "..", "pathflow", "viewer_static", "vendor");
mkdirSync(join(out, "licenses"), { recursive: true });
const version = (p) => JSON.parse(readFileSync(join(mods, p, "package.json"), "utf8")).version;

for (const [pkg, file] of [["d3", "dist/d3.min.js"], ["dagre", "dist/dagre.min.js"], ["pako", "dist/pako.min.js"]]) {
  copyFileSync(join(mods, pkg, file), join(out, file.split("/").at(-1)));
}
for (const pkg of ["d3", "d3-collection", "d3-jetpack", "dagre", "pako"]) {
  copyFileSync(join(mods, pkg, "LICENSE"), join(out, "licenses", `${pkg}-${version(pkg)}.txt`));
}
writeFileSync(join(out, "jetpack.js"), jetpack());
writeFileSync(join(out, "versions.json"), JSON.stringify(Object.fromEntries(
  ["d3", "d3-collection", "d3-jetpack", "dagre", "pako"].map((p) => [p, version(p)])), null, 1) + "\n");

// The page's jetpack (transformer-circuits.pub's 2024 build) is d3-jetpack with d3-collection's nest (gone from
// d3 v7): npm's d3-jetpack CommonJS build, run with the page's d3 as every module it requires, extends window.d3;
// conventions() gets the drawAxis(svg) method the page's build has (npm's has d3.drawAxis(c)).
function jetpack() {
  return "/* d3-collection " + version("d3-collection") + " (BSD-3-Clause) and d3-jetpack " + version("d3-jetpack") +
    " (BSD-3-Clause): licenses/ */\n" +
    readFileSync(join(mods, "d3-collection/dist/d3-collection.js"), "utf8") +
    "\n(function () { var module = {exports: {}}, exports = module.exports, require = function () { return window.d3 };\n" +
    readFileSync(join(mods, "d3-jetpack/build/d3-jetpack.cjs"), "utf8") +
    "\nfor (var k in module.exports) if (!(k in window.d3)) window.d3[k] = module.exports[k];" +
    "\nvar conventions = window.d3.conventions; window.d3.conventions = function (c) { c = conventions(c);" +
    " c.drawAxis = function (svg) { var own = c.svg; if (svg) c.svg = svg; var r = window.d3.drawAxis(c);" +
    " c.svg = own; return r }; return c } })()\n";
}
