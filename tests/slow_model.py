"""A small CNN whose forward pass sleeps, so a test can kill an extraction mid-way.

Loaded through the real registry path: ``custom:tests.slow_model:build``.
"""

import time

import torch
from torch import nn


class SlowNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        time.sleep(0.15)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def build() -> nn.Module:
    return SlowNet()
