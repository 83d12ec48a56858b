//! Criterion benchmarks of this workspace; see `benches/`.
