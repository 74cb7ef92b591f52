//! Response-based knowledge distillation (Hinton et al. 2015): the student matches a frozen
//! teacher's temperature-softened predictions, `alpha CE + (1 - alpha) T^2 KL(teacher ||
//! student)`, on its labelled rows and (soft term only) the unlabelled ones.

use super::Distill;
use crate::backend::Backend;

/// Response-based KD: everything the trait's defaults give (one frozen teacher's logits as soft
/// targets, the soft-target term).
pub struct Kd;

impl Distill for Kd {
    type Modules<B: Backend> = ();

    fn name(&self) -> &'static str {
        "kd"
    }

    fn about(&self) -> &'static str {
        "Response-based KD (Hinton): the soft targets of a frozen teacher"
    }
}
