fn main() {
    // Only the trainer links libtorch (the `torch` feature).
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some() {
        confer_build_support::link_libtorch();
    }
}
