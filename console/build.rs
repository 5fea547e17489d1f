//! The console embeds its chart library from `console/node_modules`, which
//! `deploy/bootstrap.sh` installs with `npm ci` from `package-lock.json`
//! (every `make` target runs it first). Nothing is fetched at run time.

use std::path::Path;

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let echarts = Path::new(&dir).join("node_modules/echarts/dist/echarts.min.js");
    println!("cargo:rerun-if-changed={}", echarts.display());
    println!("cargo:rerun-if-changed=assets");
    println!("cargo:rerun-if-changed=package-lock.json");
    if !echarts.is_file() {
        panic!(
            "{} is missing: the console embeds ECharts from the npm lock file; run \
             `deploy/bootstrap.sh` (or `npm ci` in console/) first",
            echarts.display()
        );
    }
}
