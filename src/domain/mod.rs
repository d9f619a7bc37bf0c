//! The vocabulary every stage shares, all pure: the catalog of providers,
//! models, classes and prices ([`pricing`]), a job line and its options
//! ([`job`]), and token estimates ([`estimate`]).

pub mod bounds;
pub mod estimate;
pub mod job;
pub mod policy;
pub mod pricing;
pub mod units;
