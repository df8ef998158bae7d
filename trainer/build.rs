//! Link-time glue for libtorch (rpath, keep libtorch_cuda); see link_libtorch.rs.
include!("link_libtorch.rs");
