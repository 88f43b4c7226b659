"""The LEM time loop in plain autograd operations (docs/paper.md §1): the one definition of the math.

`LEM`'s 'reference' backend runs `time_loop` with the layer's own nn.Linear modules as the
recurrent products (so that whatever hangs on them runs at every step); the fused backends'
autograd formulas run `layer` on the saved input tensors where their own backward cannot serve:
for second derivatives (the backward itself differentiated) and under torch.func transforms.
"""
import torch
import torch.nn.functional as F

# The H-blocks of the pre-activations (docs/paper.md §1), by who lays them out how. inp2hid's 4H rows
# keep the reference code's order, which the layer, lem_step below and the C++ kernel (its saved
# activations and d u_proj too) use; hid2hid's 3H rows and transform_z's H are that order less the
# block the other one holds. The GPU tiers' (T, B, 4H) buffers put hid2hid's blocks first and
# transform_z's last, so that one product's output lines up with one contiguous part of them.
INP2HID_BLOCKS = ("gate y", "gate z", "cand y", "cand z")
HID2HID_BLOCKS = ("gate y", "gate z", "cand z")
TRANSFORM_Z_BLOCKS = ("cand y",)
GPU_BLOCKS = HID2HID_BLOCKS + TRANSFORM_Z_BLOCKS


def reorder(t, source, target):
    """t (4H, ...) or (4H,) with its four H-blocks along dim 0 in the order `source`, in the order `target`."""
    blocks = dict(zip(source, t.chunk(4)))
    return torch.cat([blocks[name] for name in target])


def lem_step(u_proj, y, z, hid2hid, transform_z, dt, y_mask=None):
    """One LEM step. u_proj = inp2hid(u_n), already computed for all steps at once; hid2hid and
    transform_z are callables (the layer's nn.Linear modules, or `linear` of their weights).
    y_mask: optional state-dropout mask on y_{n-1} where it enters the recurrent weights."""
    u_gate_y, u_gate_z, u_cand_y, u_cand_z = u_proj.chunk(4, -1)  # INP2HID_BLOCKS
    h_gate_y, h_gate_z, h_cand_z = hid2hid(y if y_mask is None else y * y_mask).chunk(3, -1)  # HID2HID_BLOCKS
    dt_y = dt * torch.sigmoid(u_gate_y + h_gate_y)
    dt_z = dt * torch.sigmoid(u_gate_z + h_gate_z)
    z = (1.0 - dt_z) * z + dt_z * torch.tanh(u_cand_z + h_cand_z)
    y = (1.0 - dt_y) * y + dt_y * torch.tanh(transform_z(z) + u_cand_y)  # uses z_n, not z_{n-1}
    return y, z


def time_loop(u_proj, y, z, hid2hid, transform_z, dt, y_mask=None, lengths=None):
    """ys and zs (T, B, H) of every step for u_proj (T, B, 4H) from the state (y, z); with lengths
    (B,), a masked update keeps row b's state as it is from step lengths[b] on."""
    live = None if lengths is None else \
        torch.arange(u_proj.size(0), device=u_proj.device)[:, None, None] < lengths[:, None]  # (T, B, 1)
    ys, zs = [], []
    for t, u in enumerate(u_proj):
        y_new, z_new = lem_step(u, y, z, hid2hid, transform_z, dt, y_mask)
        y, z = (y_new, z_new) if live is None else (torch.where(live[t], y_new, y), torch.where(live[t], z_new, z))
        ys.append(y)
        zs.append(z)
    return torch.stack(ys), torch.stack(zs)


def linear(weight, bias):
    """The product v ↦ v Wᵀ + b of a Linear's weights, as a callable for lem_step."""
    return lambda v: F.linear(v, weight, bias)


def layer(x, w_in, b_in, y0, z0, w_hh, b_hh, w_tz, b_tz, mask, lengths, dt):
    """ys, zs (T, B, H) of one layer on x (T, B, I), from its weights (the fused operators' arguments)."""
    return time_loop(F.linear(x, w_in, b_in), y0, z0, linear(w_hh, b_hh), linear(w_tz, b_tz), dt, mask, lengths)


def functorch_wrapped(*tensors):
    """Whether a tensor is a torch.func transform's wrapper (vmap's batched tensor, grad's tracked
    one) or a batched gradient of autograd.grad(is_grads_batched=True) (gradcheck's check_batched_grad):
    it has no storage for the fused kernels to read."""
    functorch = torch._C._functorch
    return any(t is not None and (functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t))
               for t in tensors)


def recomputed_grads(inputs, needs, outputs_of, grad_outputs, dt):
    """The gradients of the layer at `inputs` (layer's tensor arguments, x .. lengths) that `needs`
    marks, for the output gradients `grad_outputs` (None: none reached that output), by a vjp
    through the reference loop. outputs_of(ys, zs) picks the outputs the gradients belong to.

    torch.func.vjp rather than autograd.grad, so that it works on the tensors of any transform
    (under torch.func.vjp/jacrev the saved inputs belong to a transform's level that autograd.grad
    would not see, and give zeros); its operations are recorded by autograd where the inputs require
    grad in grad mode (a backward with create_graph=True), so second derivatives are the reference's."""
    wanted = [i for i, need in enumerate(needs) if need]

    def outputs(*tensors):
        args = list(inputs)
        for i, t in zip(wanted, tensors):
            args[i] = t
        return outputs_of(*layer(*args, dt))
    outs, vjp = torch.func.vjp(outputs, *(inputs[i] for i in wanted))
    grads = iter(vjp(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grad_outputs))))
    return [next(grads) if need else None for need in needs]
