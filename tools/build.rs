//! Same libtorch rpath / no-as-needed link arguments as the trainer (see trainer/link_libtorch.rs).
include!("../trainer/link_libtorch.rs");
