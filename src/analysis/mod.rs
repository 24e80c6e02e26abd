//! Pure analysis over ndarray: PCA and per-point metrics. No I/O; unit-tested on hand-made arrays.
//! Depth indices are points 0..=n_layer (see the README, "Points").

pub mod attention;
pub mod attribution;
pub mod bootstrap;
pub mod cka;
pub mod contrast;
pub mod drift;
pub mod effects;
pub mod lens;
pub mod metrics;
pub mod pca;
