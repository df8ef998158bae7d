//! Link-time glue for libtorch (rpath, keep libtorch_cuda); see ../trainer/link_libtorch.rs.
include!("../trainer/link_libtorch.rs");

fn main() {
    link_libtorch();
}
