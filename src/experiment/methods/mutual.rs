//! Deep mutual learning (Zhang et al. 2018): no frozen teacher's targets; the student and a
//! second network of the same architecture (the peer, from its own initialisation) learn
//! together on the same batches, each from its labels and from the other, with the gradient
//! flowing through both sides of both divergences.
//!
//! The fold's teacher is still trained and reported in the table; it teaches nothing here.

use super::{Distill, Setup, SoftTargets, Step, Term};
use crate::backend::Backend;
use crate::error::Result;
use crate::nn::Net;
use crate::ops::TeacherInput;

pub struct Mutual;

impl Distill for Mutual {
    /// The peer.
    type Modules<B: Backend> = Net<B>;

    fn name(&self) -> &'static str {
        "mutual"
    }

    fn about(&self) -> &'static str {
        "Deep mutual learning: two students, gradients through both sides of the divergence"
    }

    fn soft_targets<B: Backend>(&self, _: &Setup<'_, B>) -> Result<Option<SoftTargets>> {
        Ok(None)
    }

    fn terms<'a, B: Backend + 'a>(&self, peer: &Net<B>, s: &mut Step<'a, '_, B>) -> Result<()> {
        let student = s.student.logits;
        let pf = peer.forward(s.tape, s.x)?;
        let peer_ce = s.cross_entropy(pf.logits)?;
        s.add(Term::auxiliary(peer_ce));
        // Each network distils from the other; the divergence's teacher-side gradient trains the
        // peer through the same term. The student's divergence is in its objective.
        let student_kd = s.divergence(student, pf.logits, TeacherInput::Logits)?;
        s.add(Term::objective(student_kd, 1.0 - s.cfg.alpha));
        let peer_kd = s.divergence(pf.logits, student, TeacherInput::Logits)?;
        s.add(Term::auxiliary(peer_kd));
        s.train(pf.params);
        Ok(())
    }
}
