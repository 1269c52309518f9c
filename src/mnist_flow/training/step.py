"""One SGD step of the MLP written out by hand: forward, softmax cross-entropy, backward and the
momentum update, in place and without autograd.

At batch 64 the matrix products of a step are small (about half a millisecond in bfloat16 on two
CPU cores), so what surrounds them decides the speed. With autograd, autocast and
``torch.optim.SGD``, the rest cost as much again: recording the graph, casting every weight to
bfloat16 on every forward and every weight gradient back to float32, and the optimizer's separate
passes over memory (docs/benchmarks.md, "Profile"). This step does the same arithmetic as

    loss = F.cross_entropy(model(x), y)          # under autocast for bf16
    loss.backward()
    torch.optim.SGD(model.parameters(), lr, momentum, weight_decay=wd).step()

(tests/code/test_step.py holds it to that), in fewer operations:

- the gradient of the input is never computed;
- each layer is updated as soon as its gradients exist, while they are still in cache;
- fp32: the momentum update is folded into the weight-gradient matmul (``addmm`` with ``beta``);
- bf16: the bfloat16 copy of every weight is kept between steps and refreshed once per update,
  instead of being cast on every forward.

Weights, momentum buffers, the loss and the softmax stay float32 in both precisions; only the
matrix products (and the activations between them) are bfloat16 in ``bf16``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

LRSchedule = Callable[[int], float]


def constant(lr: float) -> LRSchedule:
    return lambda step: lr


def one_cycle(
    max_lr: float, total_steps: int, pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4
) -> LRSchedule:
    """The learning rate of ``torch.optim.lr_scheduler.OneCycleLR`` (cosine, two phases) at each step.

    Warm up from ``max_lr / div_factor`` to ``max_lr`` over the first ``pct_start`` of the steps, then
    anneal to ``max_lr / div_factor / final_div_factor``. Momentum is not cycled: it is a searched
    hyperparameter. The values match OneCycleLR's (tests/code/test_step.py).
    """
    initial = max_lr / div_factor
    final = initial / final_div_factor
    warm_end = float(pct_start * total_steps) - 1
    last = total_steps - 1

    def cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    def lr(step: int) -> float:
        if step <= warm_end:
            return cos(initial, max_lr, step / warm_end)
        return cos(max_lr, final, (step - warm_end) / (last - warm_end))

    return lr


class MLPStep:
    """The optimizer and the backward pass of an ``MLP`` in one object.

    ``step(inputs, targets)`` trains on one batch and returns the batch's summed cross-entropy (a
    0-dim float32 tensor on the model's device, so the caller never waits for the device). The
    model's parameters are updated in place; the momentum buffers live here, across epochs.
    ``inputs`` must be in ``self.dtype`` (``train.train_epoch`` casts each batch).
    """

    def __init__(
        self, model: nn.Module, *, lr: LRSchedule, momentum: float, weight_decay: float = 0.0, precision: str = "fp32"
    ) -> None:
        net = getattr(model, "net", None)
        modules = list(net) if isinstance(net, nn.Sequential) else []
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        expected = [nn.Linear, nn.ReLU] * (len(linears) - 1) + [nn.Linear]
        if not linears or [type(m) for m in modules] != expected:
            raise TypeError("MLPStep trains an mnist_flow.training.model.MLP (Linear, ReLU, ..., Linear)")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.count = 0
        self.weights = [m.weight.detach() for m in linears]  # share storage: updates land in the model
        self.biases = [m.bias.detach() for m in linears]
        self.weight_momenta = [torch.zeros_like(w) for w in self.weights]
        self.bias_momenta = [torch.zeros_like(b) for b in self.biases]
        # What the matmuls read: the parameters themselves in fp32, kept copies in bf16.
        self.low_weights = [w.to(self.dtype) for w in self.weights]
        self.low_biases = [b.to(self.dtype) for b in self.biases]
        # bf16 weight gradients land here before the float32 momentum update.
        self.weight_grads = [torch.empty_like(w, dtype=self.dtype) for w in self.weights] if self.low_precision else []
        self._minus_one = torch.full((1, 1), -1.0, device=self.weights[0].device)

    @property
    def low_precision(self) -> bool:
        return self.dtype != torch.float32

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lr = self.lr(self.count)
        self.count += 1
        n = inputs.shape[0]
        last = len(self.weights) - 1

        # Forward: keep every layer's input (the ReLU outputs) for the backward pass.
        acts = [inputs]
        for i, (w, b) in enumerate(zip(self.low_weights, self.low_biases)):
            z = torch.addmm(b, acts[-1], w.t())
            acts.append(z.relu_() if i < last else z)

        # Softmax cross-entropy, in float32: d(mean loss)/d(logits) = (softmax - one_hot) / n.
        log_probs = torch.log_softmax(acts.pop().float(), dim=1)
        target_col = targets.unsqueeze(1)
        loss_sum = log_probs.gather(1, target_col).sum().neg()
        grad = log_probs.exp_().scatter_add_(1, target_col, self._minus_one.expand(n, 1))
        grad = torch.mul(grad, 1.0 / n, out=torch.empty_like(grad, dtype=self.dtype))

        # Backward, last layer first; each layer is updated once its input gradient is taken.
        for i in range(last, -1, -1):
            a = acts[i]
            upstream = torch.ops.aten.threshold_backward(torch.mm(grad, self.low_weights[i]), a, 0) if i > 0 else None
            self._update_weight(i, grad, a, lr)
            self._update_bias(i, grad, lr)
            if upstream is not None:
                grad = upstream
        return loss_sum

    def _update_weight(self, i: int, grad: torch.Tensor, a: torch.Tensor, lr: float) -> None:
        w, buf = self.weights[i], self.weight_momenta[i]
        if self.low_precision:  # buf = momentum * buf + grad_w, reading the bf16 gradient once
            torch.add(torch.mm(grad.t(), a, out=self.weight_grads[i]), buf, alpha=self.momentum, out=buf)
        else:  # the same, in the matmul itself
            torch.addmm(buf, grad.t(), a, beta=self.momentum, out=buf)
        self._finish(w, buf, self.low_weights[i], lr)

    def _update_bias(self, i: int, grad: torch.Tensor, lr: float) -> None:
        b, buf = self.biases[i], self.bias_momenta[i]
        torch.add(grad.sum(0, dtype=torch.float32), buf, alpha=self.momentum, out=buf)
        self._finish(b, buf, self.low_biases[i], lr)

    def _finish(self, param: torch.Tensor, buf: torch.Tensor, low: torch.Tensor, lr: float) -> None:
        if self.weight_decay:  # SGD's coupled L2: grad + wd * param enters the momentum
            buf.add_(param, alpha=self.weight_decay)
        param.add_(buf, alpha=-lr)
        if self.low_precision:
            low.copy_(param)
