"""The PyTorch tutorial's CIFAR-10 loop, as written there: LeNet, batch 4, per-image ToTensor/Normalize,
SGD lr 0.001 momentum 0.9, 2 epochs. Runs on an extracted image folder (train/<class>, test/<class>), or,
with --fashion-mnist, on Fashion-MNIST through torchvision.datasets.FashionMNIST with the one-channel LeNet
of PyTorch's own Fashion-MNIST tutorial ("Visualizing models, data, and training with TensorBoard": conv
1->6, fc1 16*4*4), the same loop otherwise.

    python bench/tutorial.py IMAGE_ROOT RESULT_JSON
    python bench/tutorial.py --fashion-mnist IDX_GZ_FOLDER RESULT_JSON
"""

import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torchvision
import torchvision.transforms as transforms


class Net(nn.Module):
    def __init__(self, channels=3, side=5):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def fashion_mnist_root(idx_folder: str) -> str:
    """torchvision's FashionMNIST layout (<root>/FashionMNIST/raw/<files>) from the four .gz IDX files."""
    import gzip
    import os
    import tempfile

    root = tempfile.mkdtemp(prefix="tutorial-fmnist-")
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        with gzip.open(os.path.join(idx_folder, name + ".gz")) as source, open(os.path.join(raw, name), "wb") as target:
            target.write(source.read())
    return root


def main(root: str, result_path: str, fashion_mnist: bool = False) -> None:
    started = time.perf_counter()
    torch.manual_seed(0)
    if fashion_mnist:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
        data_root = fashion_mnist_root(root)
        trainset = torchvision.datasets.FashionMNIST(data_root, train=True, download=False, transform=transform)
        testset = torchvision.datasets.FashionMNIST(data_root, train=False, download=False, transform=transform)
    else:
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        trainset = torchvision.datasets.ImageFolder(f"{root}/train", transform=transform)
        testset = torchvision.datasets.ImageFolder(f"{root}/test", transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)
    testloader = torch.utils.data.DataLoader(testset, batch_size=4, shuffle=False, num_workers=2)
    net = Net(1, 4) if fashion_mnist else Net()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    train_started = time.perf_counter()
    for epoch in range(2):
        running_loss = 0.0
        for i, (inputs, labels) in enumerate(trainloader, 0):
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            if i % 2000 == 1999:
                print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}", flush=True)
                running_loss = 0.0
    train_seconds = time.perf_counter() - train_started
    correct = total = 0
    with torch.no_grad():
        for images, labels in testloader:
            predicted = net(images).argmax(1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    result = {
        "test_accuracy": correct / total,
        "test_images": total,
        "train_images": 2 * len(trainset),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    print(json.dumps(result))
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1] == "--fashion-mnist":
        main(sys.argv[2], sys.argv[3], fashion_mnist=True)
    else:
        main(sys.argv[1], sys.argv[2])
