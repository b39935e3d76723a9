mod abuse;
mod blobs;
mod faults;
mod logs;
mod manifests;
mod ops;
mod real;
mod shared;
