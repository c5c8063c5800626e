"""Robot actions from images and words: a 2-D tabletop, a scripted expert, a VLA's training and
closed-loop evaluation (issue 20).

Where each module sits in the layers (DESIGN.md):

* data level: ``sim`` (physics, rendering with the synthetic-scene shapes and colours),
  ``expert`` (discrete action space, scripted policy), ``instructions`` (en / ko),
  ``demos`` (expert rollouts → .npz);
* the model is ``imagefm.models.vla`` (ViT + Llama-family decoder, actions as tokens; its
  pointer head, ``imagefm.models.vla_pointers``, is supervised with the simulator's state);
* train level: ``training`` (tokenizer, batches, ``VLATask``, the project's ``Trainer``);
* eval level: ``closed_loop`` (success rates, GIF rollouts), ``dagger`` (the policy drives,
  the expert labels, training continues on the grown set);
* ``imagefm.cli.vla`` puts ``imagefm vla train|eval|rollout`` on top.

This package file imports nothing, so the data-level modules stay usable without the rest.
"""
