mod abuse;
mod blobs;
mod faults;
mod manifests;
mod ops;
mod real;
mod shared;
mod storm;
