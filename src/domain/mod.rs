//! The vocabulary every stage shares, all pure: the catalog of providers,
//! models, classes and prices ([`pricing`]), a job line and its options
//! ([`job`]), token estimates ([`estimate`]), and the translation to and from
//! Anthropic's Messages API ([`anthropic`]).

pub mod anthropic;
pub mod bounds;
pub mod estimate;
pub mod job;
pub mod policy;
pub mod pricing;
pub mod units;
