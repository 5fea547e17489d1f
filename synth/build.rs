fn main() {
    confer_build_support::link_libtorch();
}
