pub mod common;
pub mod inspect;
pub mod run;
