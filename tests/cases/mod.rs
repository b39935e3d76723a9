mod ops;
mod real;
