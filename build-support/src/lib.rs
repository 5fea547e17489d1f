//! Build-script helper: makes confer's executables find libtorch at run time.
//!
//! tch links against the libtorch inside the project's Python venv (the
//! `torch==2.13.0` wheel, found by torch-sys with `LIBTORCH_USE_PYTORCH=1`).
//! Linking is not enough: the dynamic loader must find `libtorch*.so` when
//! the program starts. Rather than asking users to export
//! `LD_LIBRARY_PATH`, every package that builds executables linking tch
//! calls [`link_libtorch`] from its `build.rs`, which embeds an rpath to
//! `site-packages/torch/lib` and links `libtorch` with `--no-as-needed`
//! (so the CUDA backend registers itself where a GPU is present, as tch-rs
//! documents). The torch wheel's own libraries carry rpaths to the NVIDIA
//! libraries beside them, so one rpath suffices.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Emits the link arguments; call from `build.rs`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    match libtorch_lib_dir() {
        Some(dir) => {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            if cfg!(target_os = "linux") {
                println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
                println!("cargo:rustc-link-arg=-ltorch");
                println!("cargo:rustc-link-arg=-Wl,--as-needed");
            }
        }
        None => println!(
            "cargo:warning=libtorch not found: run deploy/bootstrap.sh (or `make`) so that .venv holds torch; \
             binaries will need LD_LIBRARY_PATH to start"
        ),
    }
}

/// Where libtorch's shared libraries are: `$LIBTORCH/lib`, or the `torch`
/// package of the Python that torch-sys uses (the venv's when active), or
/// the workspace's `.venv`.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    if let Some(root) = std::env::var_os("LIBTORCH") {
        let dir = Path::new(&root).join("lib");
        if dir.is_dir() {
            return Some(dir);
        }
    }
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let from_python = Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_dir());
    if from_python.is_some() {
        return from_python;
    }
    // Fall back to the workspace venv, relative to the package being built.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let venv_lib = Path::new(&manifest).parent()?.join(".venv").join("lib");
    std::fs::read_dir(venv_lib)
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let dir = e.path().join("site-packages").join("torch").join("lib");
            dir.is_dir().then_some(dir)
        })
}
