//! The local tier, always present and always first: the content-addressed store on disk
//! (`store`) and the LRU index over it (`index`).

pub mod index;
pub mod store;
