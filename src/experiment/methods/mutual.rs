//! Deep mutual learning (Zhang et al. 2018): no frozen teacher's targets; the student and a
//! second network of the same architecture (the peer, from its own initialisation) learn
//! together on the same batches, each from its labels and from the other:
//!
//! - `mutual` (standard DML): each network minimises `alpha CE + (1 - alpha) T^2 KL(p_other ||
//!   p_self)` with the other's prediction detached, so each divergence trains only the network
//!   on its student side. Both networks step from the same forward pass (the simultaneous form
//!   most implementations use; the paper's Algorithm 1 recomputes the predictions between the
//!   two updates).
//! - `mutual-coupled`: the same two divergences with the gradient flowing through both sides of
//!   each, so each network also gets the teacher-side gradient of the divergence it teaches (the
//!   form `mutual` had before it became standard DML).
//!
//! The fold's teacher is still trained and reported in the table; it teaches nothing here.

use super::{Distill, Setup, SoftTargets, Step, Term};
use crate::backend::Backend;
use crate::error::Result;
use crate::nn::Net;
use crate::ops::TeacherInput;

/// Mutual learning; `coupled` selects the form (see the module's documentation).
pub struct Mutual {
    pub coupled: bool,
}

impl Distill for Mutual {
    /// The peer.
    type Modules<B: Backend> = Net<B>;

    fn name(&self) -> &'static str {
        if self.coupled {
            "mutual-coupled"
        } else {
            "mutual"
        }
    }

    fn about(&self) -> &'static str {
        if self.coupled {
            "Mutual learning with the gradient through both sides of both divergences"
        } else {
            "Deep mutual learning: two students, each learning from the other's detached predictions"
        }
    }

    fn soft_targets<B: Backend>(&self, _: &Setup<'_, B>) -> Result<Option<SoftTargets>> {
        Ok(None)
    }

    fn terms<'a, B: Backend + 'a>(&self, peer: &Net<B>, s: &mut Step<'a, '_, B>) -> Result<()> {
        let student = s.student.logits;
        let pf = peer.forward(s.tape, s.x)?;
        let peer_ce = s.cross_entropy(pf.logits)?;
        s.add(Term::auxiliary(peer_ce));
        // The student's divergence from the peer (in the student's objective), then the peer's
        // from the student.
        let from_peer = if self.coupled {
            pf.logits
        } else {
            s.detach(pf.logits)?
        };
        let student_kd = s.divergence(student, from_peer, TeacherInput::Logits)?;
        s.add(Term::objective(student_kd));
        let from_student = if self.coupled {
            student
        } else {
            s.detach(student)?
        };
        let peer_kd = s.divergence(pf.logits, from_student, TeacherInput::Logits)?;
        s.add(Term::auxiliary(peer_kd));
        s.train(pf.params);
        Ok(())
    }
}
